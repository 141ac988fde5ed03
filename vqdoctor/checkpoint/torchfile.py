"""Load torch.save files with the weights-only unpickler, memory-mapped where the format allows.

Safety decisions (checked against torch 2.13's `torch/serialization.py`):
- `weights_only` is always passed explicitly. `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` only changes the
  default when the argument is *not* passed, so it cannot turn the safe loader off here
  (tests/test_checkpoint.py sets it and loads a malicious file).
- A refused file is never retried with `weights_only=False`: only `trust=True` does that.
- `mmap=True` for the zip format maps the file; tensors are views on the mapping and their pages
  are read only when the data is used.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
from typing import Any

import torch

from vqdoctor.errors import CheckpointError, UnsafeCheckpointError

TRUST_HINT = ("use --trust-checkpoint (trust=True) only if you trust the file: full unpickling "
              "runs any code it contains")

_TORCH_SAFE = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6)


def load_torch(path: str, *, zip_format: bool, trust: bool = False) -> Any:
    """The object stored by `torch.save` at `path`, on the CPU.

    Args:
        path: a regular file already identified as torch zip or legacy pickle.
        zip_format: True for the zip format (memory-mapped), False for the legacy pickle.
        trust: unpickle fully (`weights_only=False`); runs code from the file.

    Raises:
        UnsafeCheckpointError: the weights-only unpickler refuses the file (names the globals).
        CheckpointError: the file is truncated, corrupt, or not a torch checkpoint.
    """
    if trust:
        warnings.warn("vqdoctor: trusted checkpoint loading (weights_only=False): code inside "
                      "the file can run", UserWarning, stacklevel=2)
    elif not _TORCH_SAFE:
        warnings.warn(f"torch {torch.__version__} < 2.6: its weights-only unpickler can be "
                      "bypassed (CVE-2025-32434); upgrade torch", UserWarning, stacklevel=2)
    weights_only = not trust
    try:
        if path.endswith(".safetensors"):
            # torch.load hands any path ending in .safetensors to safetensors by name; this file is
            # a torch.save by content, so pass a file object (which cannot be mapped).
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=weights_only, mmap=False)
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zip_format)
    except pickle.UnpicklingError as e:
        raise _refused(path, e, zip_format) from None
    except Exception as e:
        raise _unreadable(path, e, zip_format) from None


def _refused(path: str, err: Exception, zip_format: bool) -> CheckpointError:
    names: list[str] = []
    if zip_format:
        try:
            # Static scan of data.pkl; nothing is unpickled. Fails on opcodes it does not know.
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            names = []
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
    if "not in a subdirectory" in text or "failed locating file" in text:
        return CheckpointError("is a zip archive but not a torch.save checkpoint", path=path)
    if zip_format and isinstance(err, (RuntimeError, OSError)):
        return CheckpointError(f"is a truncated or corrupt torch zip archive ({first[:120]})",
                               path=path)
    if isinstance(err, (EOFError, RuntimeError)) and ("EOF" in text or not text):
        return CheckpointError("is a truncated torch checkpoint (unexpected end of file)", path=path)
    return CheckpointError(f"cannot be read as a torch checkpoint ({type(err).__name__}: "
                           f"{first[:160]})", path=path)
