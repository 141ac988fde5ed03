"""Load torch.save files with the weights-only unpickler, memory-mapped where the format allows.

Safety decisions (checked against torch 2.13's `torch/serialization.py`):
- `weights_only` is always passed explicitly. `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` only changes the
  default when the argument is *not* passed, so it cannot turn the safe loader off here
  (tests/test_checkpoint.py sets it and loads a malicious file).
- A refused file is never retried with `weights_only=False`: only `trust=True` does that.
- `mmap=True` for the zip format maps the file; tensors are views on the mapping and their pages
  are read only when the data is used. torch.save stores zip members uncompressed; a member
  that is deflated (a recompressed or crafted archive) cannot be mapped, and is checked against
  the memory budget by its declared size before torch inflates it (`limits.check_size`).
- numpy arrays, dtypes and scalars are allowed for this call only (`numpy_safe.allowed`).
- torch's own warnings during the load (deprecated storages, pickle protocol, TorchScript
  dispatch) are about torch internals, not the file: they are not shown.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any

import torch

from vqdoctor.checkpoint import numpy_safe
from vqdoctor.checkpoint.limits import DEFAULT_MAX_MEMORY, check_size
from vqdoctor.errors import CheckpointError, MemoryBudgetError, UnsafeCheckpointError

TRUST_HINT = ("use --trust-checkpoint (trust=True) only if you trust the file: full unpickling "
              "runs any code it contains")

_TORCH_SAFE = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6)


def deflated_members(path: str, max_memory: int = DEFAULT_MAX_MEMORY) -> bool:
    """True when a zip archive has compressed members; each is checked against the budget first.

    Raises:
        MemoryBudgetError: a member's declared size is over the budget, or it inflates more
            than `limits.EXPANSION_RATIO`-fold and over its share of the budget.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # torch's reader gives the message for a broken archive
    deflated = False
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED:
            deflated = True
            check_size(f"zip member {m.filename}", (m.file_size,), 1, max_memory,
                       stored_bytes=m.compress_size, view="deflated", path=path, as_float=False)
    return deflated


def load_torch(path: str, *, zip_format: bool, trust: bool = False,
               max_memory: int = DEFAULT_MAX_MEMORY) -> Any:
    """The object stored by `torch.save` at `path`, on the CPU.

    Args:
        path: a regular file already identified as torch zip or legacy pickle.
        zip_format: True for the zip format (memory-mapped), False for the legacy pickle.
        trust: unpickle fully (`weights_only=False`); runs code from the file.
        max_memory: memory budget in bytes for data the file does not store one-to-one
            (deflated members, numpy arrays' declared shapes).

    Raises:
        UnsafeCheckpointError: the weights-only unpickler refuses the file (names the globals).
        MemoryBudgetError: a deflated member or a declared array is over the budget.
        CheckpointError: the file is truncated, corrupt, or not a torch checkpoint.
    """
    if trust:
        warnings.warn("vqdoctor: trusted checkpoint loading (weights_only=False): code inside "
                      "the file can run", UserWarning, stacklevel=2)
    elif not _TORCH_SAFE:
        warnings.warn(f"torch {torch.__version__} < 2.6: its weights-only unpickler can be "
                      "bypassed (CVE-2025-32434); upgrade torch", UserWarning, stacklevel=2)
    weights_only = not trust
    mmap = zip_format and not deflated_members(path, max_memory)
    try:
        with warnings.catch_warnings(), numpy_safe.allowed(max_memory):
            warnings.simplefilter("ignore")
            if path.endswith(".safetensors"):
                # torch.load hands any path ending in .safetensors to safetensors by name; this file
                # is a torch.save by content, so pass a file object (which cannot be mapped).
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=weights_only, mmap=False)
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refused(path, e, zip_format) from None
    except numpy_safe.OverBudget as e:
        raise MemoryBudgetError(f"{e}", path=path, hint=numpy_safe.BUDGET_HINT,
                                budget=max_memory) from None
    except MemoryError:
        raise MemoryBudgetError("needs more memory to load than this machine can give", path=path,
                                hint="the file declares more data than it holds, or is too large "
                                     "for this machine") from None
    except RecursionError:
        raise CheckpointError("holds objects nested too deeply to unpickle", path=path) from None
    except Exception as e:
        raise _unreadable(path, e, zip_format) from None


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}


def scan_globals(data: bytes) -> list[str]:
    """The globals a pickle names, STACK_GLOBAL ones included; a static scan, nothing is unpickled.

    torch's own scan (`get_unsafe_globals_in_checkpoint`) stops at opcodes it does not know;
    this one follows the strings a STACK_GLOBAL takes (also through the memo).
    """
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRINGS and isinstance(arg, (str, bytes)):
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
                continue
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(".".join(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE") and strings:
                memo[int(arg) if arg is not None else len(memo)] = strings[-1]
                continue
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[int(arg)])
                continue
            if op.name not in ("MARK", "FRAME"):  # anything else ends a run of pushed strings
                strings.clear()
    except Exception:  # a truncated or crafted stream: what was found so far
        pass
    return sorted(set(names))


def _pickle_bytes(path: str) -> bytes:
    """data.pkl of a torch zip (stored members only: deflated ones were checked, not re-read)."""
    with zipfile.ZipFile(path) as zf:
        for m in zf.infolist():
            if m.filename.endswith("data.pkl") and m.file_size <= 64 << 20:
                return zf.read(m)
    return b""


def _refused(path: str, err: Exception, zip_format: bool) -> CheckpointError:
    names: list[str] = []
    if zip_format:
        try:
            # Static scan of data.pkl; nothing is unpickled. Fails on opcodes it does not know.
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            names = []
        if not names:
            try:
                names = scan_globals(_pickle_bytes(path))
            except (zipfile.BadZipFile, OSError, ValueError):
                names = []
    names = [n for n in names if n not in numpy_safe.safe_names()]
    if not names:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
    if names:
        return UnsafeCheckpointError(
            f"needs Python globals that a weights-only load refuses to build: {', '.join(names)}",
            path=path, hint=TRUST_HINT, globals=names)
    return UnsafeCheckpointError(f"is refused by the weights-only unpickler ({_reason(err)})",
                                 path=path, hint=TRUST_HINT)


def _reason(err: Exception) -> str:
    """The line of torch's long UnpicklingError text that says what was refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = ([ln for ln in lines if not ln.startswith(boilerplate)] or lines or [type(err).__name__])[0]
    m = re.fullmatch(r"Unsupported operand (\d+)", reason)
    op = pickletools.code2op.get(chr(int(m.group(1)))) if m and int(m.group(1)) < 256 else None
    return f"pickle opcode {op.name} is not allowed" if op else reason


def _unreadable(path: str, err: Exception, zip_format: bool) -> CheckpointError:
    text = str(err)
    # torch's messages run on for lines; the first sentence says what failed
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(err).__name__
    if "TorchScript" in text:
        return CheckpointError("is a TorchScript archive, which a weights-only load cannot read",
                               path=path, hint=TRUST_HINT)
    if any(s in text for s in ("not resizable", "out of bounds for storage", "setStorage")):
        return CheckpointError("has a tensor whose size, strides or storage offset reach past its "
                               f"stored data (a corrupt or crafted file: {first[:120]})", path=path)
    if "wrong byte size" in text:
        return CheckpointError("is a corrupt legacy torch file: a storage's declared size does not "
                               f"match the data stored ({first[:120]})", path=path)
    if "not in a subdirectory" in text or "failed locating file" in text:
        return CheckpointError("is a zip archive but not a torch.save checkpoint", path=path)
    if zip_format and isinstance(err, (RuntimeError, OSError)):
        return CheckpointError(f"is a truncated or corrupt torch zip archive ({first[:120]})",
                               path=path)
    if isinstance(err, (EOFError, RuntimeError)) and ("EOF" in text or not text):
        return CheckpointError("is a truncated torch checkpoint (unexpected end of file)", path=path)
    return CheckpointError(f"cannot be read as a torch checkpoint ({type(err).__name__}: "
                           f"{first[:160]})", path=path)
