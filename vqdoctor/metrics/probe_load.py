"""Reading a probe file safely and boundedly: `read_probe` (what `vqdoctor inspect --probe` reads).

Formats: `.safetensors`, `.npy`, `.npz` (`allow_pickle=False`), and torch.save files (zip or
legacy, weights-only, memory-mapped where the format allows, numpy values allowed as in
checkpoints). Nothing from the file runs, and nothing is materialised before its size is known:

- every tensor's size is checked first: data that expands far beyond what the file stores (a
  stride-0 view, a deflated `.npz` member, a `.npy` header declaring more than the file holds) is
  refused with one line (`vqdoctor.checkpoint.limits`);
- a probe over the memory budget is *sampled*, not refused, where the format allows reading part
  of it (torch zip, `.npy`, `.safetensors`): evenly spread slices along dim 0 (the batch or
  token axis), said in a note; a deflated `.npz` cannot be read in part and is refused;
- 0-dim, empty, meta, sparse, quantized, complex and non-numeric entries are refused by name.

`PATH:KEY` reads one entry of a dict probe (`--probe z.pt:z_e`).
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqdoctor.checkpoint import limits
from vqdoctor.errors import CheckpointError, InputError, ProbeError

# Keys under which a probe file may wrap its payload.
WRAPPER_KEYS = ("z", "probe")
SAMPLE_BLOCKS = 64
"""Contiguous slices a sampled probe is read in (evenly spread; contiguous reads stay cheap)."""

Probe = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class LoadedProbe:
    """A probe as read: the vectors, and what the reader had to decide about them.

    Attributes:
        value: a tensor, or a dict entry name -> tensor (float32, CPU).
        path: the file.
        key: the entry chosen with `PATH:KEY`, if any.
        integer_keys: dict entries stored with integer or bool dtypes (indices, labels): never
            matched to a quantizer by shape.
        notes: sentences for the report (sampling).
        used: quantizer name -> the entry it was given (filled by `probe_inputs`).
    """

    value: Probe
    path: str
    key: str | None = None
    integer_keys: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    used: dict[str, str] = field(default_factory=dict)


def split_spec(spec: str) -> tuple[str, str | None]:
    """`z.pt:z_e` -> ("z.pt", "z_e"); a path that exists as given is never split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    head, _, key = spec.rpartition(":")
    if head and key and os.path.isfile(head):
        return head, key
    return spec, None


class _Entry:
    """One stored array, not yet read: its shape, dtype and a reader of dim-0 slices."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, kind: str,
                 read: Any, read_rows: Any = None):
        self.name, self.shape, self.dtype, self.kind = name, tuple(int(s) for s in shape), dtype, kind
        self.read, self.read_rows = read, read_rows

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _fail(path: str, what: str) -> ProbeError:
    return ProbeError(f"probe {path}: {what}")


def _what(name: str | None) -> str:
    return f"entry {name!r}" if name else "content"


def _check_kind(path: str, name: str | None, shape: tuple[int, ...], kind: str, dtype: str) -> None:
    """Refuse entries that are not vectors: 0-dim, empty, complex or non-numeric."""
    if kind == "c":
        raise _fail(path, f"{_what(name)} is complex ({dtype}); expected real-valued encoder outputs")
    if kind not in "biuf":
        raise _fail(path, f"{_what(name)} has dtype {dtype}; expected a numeric array")
    if len(shape) == 0:
        raise _fail(path, f"{_what(name)} is a 0-dim scalar, not a set of vectors "
                          "(expected [N, C], [B, C, ...] or [B, T, C])")
    if math.prod(shape) == 0:
        raise _fail(path, f"{_what(name)} is empty (shape {limits.shape_text(shape)})")


# --- formats -----------------------------------------------------------------------------------


def _torch_object(path: str, budget: int) -> Any:
    from vqdoctor.checkpoint.sniff import sniff
    from vqdoctor.checkpoint.torchfile import load_torch

    try:
        kind = sniff(path)
    except CheckpointError as e:
        raise _fail(path, f"{e.message.split(' (')[0]}; expected a tensor file (torch.save, "
                          ".safetensors, .npy or .npz)") from None
    if kind not in ("torch-zip", "torch-legacy"):
        raise _fail(path, f"is a {kind} file, not a tensor file (torch.save, .safetensors, .npy or .npz)")
    try:
        obj = load_torch(path, zip_format=kind == "torch-zip", max_memory=budget)
    except CheckpointError as e:
        raise ProbeError(f"probe {path} cannot be read safely: {e.message}", hint=e.hint) from None
    return obj


def _tensor_entry(path: str, name: str | None, t: torch.Tensor, budget: int) -> _Entry:
    dtype = str(t.dtype).removeprefix("torch.")
    if t.device.type == "meta":
        raise _fail(path, f"{_what(name)} {limits.shape_text(t.shape)} is a meta tensor: the file "
                          "stores its shape but no data")
    if t.layout != torch.strided or t.is_quantized:
        raise _fail(path, f"{_what(name)} is a {'quantized' if t.is_quantized else str(t.layout).removeprefix('torch.')} "
                          "tensor; expected a dense tensor of encoder outputs")
    kind = "c" if t.is_complex() else "b" if t.dtype == torch.bool else "f" if t.is_floating_point() else "i"
    _check_kind(path, name, tuple(t.shape), kind, dtype)
    lay = limits.layout(t)
    if lay is not None:  # expanded views are refused past their share, never sampled
        limits.check_size(_what(name), tuple(t.shape), t.element_size(), budget,
                          stored_bytes=lay.stored_bytes, view=lay.view, path=f"probe {path}",
                          dtype=dtype)
    return _Entry(name or "", tuple(t.shape), dtype, kind, read=lambda: t,
                  read_rows=lambda a, b: t[a:b])


def _numpy_entry(path: str, name: str | None, a: np.ndarray) -> _Entry:
    _check_kind(path, name, a.shape, a.dtype.kind, str(a.dtype))
    return _Entry(name or "", a.shape, str(a.dtype), a.dtype.kind, read=lambda: a,
                  read_rows=lambda i, j: a[i:j])


def _npy_header(fp: Any, path: str, name: str | None) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header end offset) from a `.npy` stream, data unread."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            shape, fortran, dtype = fmt._read_array_header(fp, version)  # noqa: SLF001 (3.0: utf-8 names)
    except Exception as e:
        raise _fail(path, f"{_what(name)} has no readable .npy header ({' '.join(str(e).split())[:120]})") from None
    return tuple(int(s) for s in shape), bool(fortran), dtype, fp.tell()


def _npy(path: str, budget: int) -> _Entry:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        shape, _, dtype, offset = _npy_header(f, path, None)
    _check_kind(path, None, shape, dtype.kind, str(dtype))
    declared = math.prod(shape) * dtype.itemsize
    if offset + declared > size:
        raise _fail(path, f"declares {limits.shape_text(shape)} {dtype} ({limits.format_size(declared)}) "
                          f"but the file holds {limits.format_size(size - offset)} of data "
                          "(a truncated file or a lying header)")
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    return _Entry("", shape, str(dtype), dtype.kind, read=lambda: np.array(mm),
                  read_rows=lambda i, j: np.array(mm[i:j]))


def _npz(path: str, budget: int) -> dict[str, _Entry]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _fail(path, f"is not a readable .npz archive ({e})") from None
    out: dict[str, _Entry] = {}
    total = 0
    with zf:
        for m in zf.infolist():
            if not m.filename.endswith(".npy"):
                continue
            name = m.filename[:-4]
            with zf.open(m) as fp:
                shape, _, dtype, offset = _npy_header(fp, path, name)
            _check_kind(path, name, shape, dtype.kind, str(dtype))
            declared = math.prod(shape) * dtype.itemsize
            if offset + declared > m.file_size:
                raise _fail(path, f"entry {name!r} declares {limits.shape_text(shape)} {dtype} "
                                  f"({limits.format_size(declared)}) but its member holds "
                                  f"{limits.format_size(max(m.file_size - offset, 0))}")
            total += math.prod(shape) * max(dtype.itemsize, 4)
            stored = m.compress_size if m.compress_type != zipfile.ZIP_STORED else None
            # a member can only be read whole: over the budget it is refused, not sampled
            limits.check_size(f"entry {name!r}", shape, dtype.itemsize, budget, stored_bytes=stored,
                              view="deflated", path=f"probe {path}", dtype=str(dtype))
            if total > budget:
                raise ProbeError(f"probe {path}: its entries take {limits.format_size(total)} as float32, "
                                 f"over the {limits.format_size(budget)} memory budget (a .npz member "
                                 "can only be read whole; save the probe with np.save or torch.save "
                                 "to have it sampled)", hint=limits.BUDGET_HINT)
            out[name] = _Entry(name, shape, str(dtype), dtype.kind,
                               read=lambda n=name: np.load(path, allow_pickle=False)[n])
    if not out:
        raise _fail(path, "holds no arrays")
    return out


def _safetensors(path: str) -> dict[str, _Entry]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as e:
        raise _fail(path, f"has a corrupt safetensors header ({' '.join(str(e).split())[:160]})") from None
    out = {}
    kinds = {"F": "f", "B": "f", "I": "i", "U": "u", "C": "c"}
    for n in names:
        sl = handle.get_slice(n)
        dt = sl.get_dtype()
        kind = "b" if dt == "BOOL" else kinds.get(dt[:1], "?")
        shape = tuple(int(s) for s in sl.get_shape())
        _check_kind(path, n, shape, kind, dt)
        out[n] = _Entry(n, shape, dt, kind, read=lambda n=n: handle.get_tensor(n),
                        read_rows=lambda i, j, sl=sl: sl[i:j])
    return out


# --- reading ------------------------------------------------------------------------------------


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    return obj


def _entries(path: str, budget: int) -> dict[str, _Entry] | _Entry:
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        found: dict[str, _Entry] | _Entry = _safetensors(path)
    elif suffix == ".npy":
        found = _npy(path, budget)
    elif suffix == ".npz":
        found = _npz(path, budget)
    else:
        obj = _unwrap(_torch_object(path, budget))
        if isinstance(obj, dict):
            found = {}
            for k, v in obj.items():
                if isinstance(v, torch.Tensor):
                    found[str(k)] = _tensor_entry(path, str(k), v, budget)
                elif isinstance(v, np.ndarray):
                    found[str(k)] = _numpy_entry(path, str(k), v)
        elif isinstance(obj, torch.Tensor):
            found = _tensor_entry(path, None, obj, budget)
        elif isinstance(obj, np.ndarray):
            found = _numpy_entry(path, None, obj)
        else:
            raise _fail(path, f"content is a {type(obj).__name__}, not a tensor")
    if isinstance(found, dict):
        if len(found) == 1 and next(iter(found)) in WRAPPER_KEYS:
            found = next(iter(found.values()))
        elif not found:
            raise ProbeError(f"probe {path} holds no tensors (expected a tensor or a dict name -> tensor)")
    return found


def _as_float(x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.detach().to("cpu", torch.float32)


def _blocks(n: int, m: int, blocks: int = SAMPLE_BLOCKS) -> list[tuple[int, int]]:
    """`blocks` contiguous [start, stop) ranges, evenly spread over n, m rows in all."""
    blocks = max(1, min(blocks, m))
    per = max(1, m // blocks)
    starts = np.linspace(0, n - per, blocks).astype(np.int64)
    return [(int(s), int(s) + per) for s in np.unique(starts)]


def _materialise(e: _Entry, share: float, path: str, notes: list[str]) -> torch.Tensor:
    """The entry as float32; a dim-0 sample of about `share` of it when share < 1."""
    if share >= 1:
        return _as_float(e.read())
    n = e.shape[0]
    m = int(n * share)
    if e.read_rows is None or m < 1:
        raise ProbeError(f"probe {path}: {_what(e.name)} {limits.shape_text(e.shape)} is over the "
                         "memory budget and cannot be sampled along dim 0", hint=limits.BUDGET_HINT)
    parts = [_as_float(e.read_rows(a, b)) for a, b in _blocks(n, m)]
    x = torch.cat(parts)
    notes.append(f"probe: {_what(e.name)} {limits.shape_text(e.shape)} is over the memory budget as "
                 f"float32; {x.shape[0]} of its {n} slices along dim 0 were measured, in "
                 f"{len(parts)} evenly spread blocks (raise --max-memory to measure all)")
    return x


def read_probe(spec: str, *, max_memory: int | str | None = None) -> LoadedProbe:
    """Read a probe file (or one entry of it, `PATH:KEY`) within a memory budget.

    Args:
        spec: the probe file, optionally `:KEY` to take one entry of a dict probe.
        max_memory: the memory budget (bytes or a size such as "4GiB"; default 1 GiB). A probe
            over it is sampled along dim 0 where the format allows, else refused.

    Returns:
        the vectors (float32, CPU) and what was decided about them.

    Raises:
        ProbeError: missing, unreadable, unsafe, hostile or non-tensor content (one line).
    """
    path, key = split_spec(str(spec))
    p = Path(path)
    if not p.exists():
        raise ProbeError(f"probe {path} does not exist")
    if not p.is_file():
        raise ProbeError(f"probe {path} is not a file")
    budget = limits.parse_size(max_memory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch / numpy internals, not the user's concern
            found = _entries(path, budget)
            if key is not None:
                if not isinstance(found, dict) or key not in found:
                    have = ", ".join(list(found)[:8]) if isinstance(found, dict) else "none (a single tensor)"
                    raise ProbeError(f"probe {path} has no entry {key!r} (entries: {have})")
                found = found[key]
            entries = found if isinstance(found, dict) else {"": found}
            total = sum(e.numel * 4 for e in entries.values())
            share = min(1.0, budget / total) if total else 1.0
            notes: list[str] = []
            values = {k: _materialise(e, share, path, notes) for k, e in entries.items()}
    except InputError:
        raise
    except MemoryError:
        raise ProbeError(f"probe {path} needs more memory than this machine can give",
                         hint=limits.BUDGET_HINT) from None
    except RecursionError:
        raise ProbeError(f"probe {path} holds objects nested too deeply to read") from None
    except Exception as e:  # each reader has its own exception family; all mean "cannot read"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ProbeError(f"probe {path} cannot be read safely: {reason}") from None
    value: Probe = values[""] if "" in values else values
    integer = {k for k, e in entries.items() if k and e.kind in "biu"}
    return LoadedProbe(value, path=path, key=key, integer_keys=integer, notes=notes)


def load_probe(path: str, *, max_memory: int | str | None = None) -> Probe:
    """The vectors of a probe file: a tensor, or a dict name -> tensor (see `read_probe`)."""
    return read_probe(path, max_memory=max_memory).value


__all__ = ["WRAPPER_KEYS", "LoadedProbe", "Probe", "load_probe", "read_probe", "split_spec"]
