"""safetensors files: names, shapes and dtypes from the header; data only for requested tensors."""

from __future__ import annotations

import re

import torch
from safetensors import safe_open

from vqdoctor.checkpoint.base import TensorInfo, TensorSource
from vqdoctor.checkpoint.containers import strip_prefixes
from vqdoctor.errors import CheckpointError

# Far above real models (~10^4 tensors per file); bounds the per-tensor work a hostile header
# with millions of tiny entries could cause.
MAX_TENSORS = 500_000

_DTYPES: dict[str, torch.dtype] = {
    name: dt for name, dt in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items() if dt is not None
}


def _natural(key: str) -> list[tuple[int, int | str]]:
    # safetensors lists names sorted as strings; "layers.10" after "layers.2" keeps levels in order.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key) if p]


def open_safetensors(paths: list[str], *, display: str, fmt: str) -> TensorSource:
    """Open one safetensors file, or the shards of one model, as a single `TensorSource`.

    Args:
        paths: the files (already checked to be safetensors by their first bytes).
        display: the path to report (the file, the index json or the folder).
        fmt: "safetensors" or "safetensors-sharded".

    Raises:
        CheckpointError: a corrupt header, or more than `MAX_TENSORS` tensors.
    """
    stored: dict[str, tuple[object, str]] = {}  # flat key -> (open file, stored name)
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    skipped: list[str] = []
    for p in paths:
        try:
            handle = safe_open(p, framework="pt", device="cpu")
            names = handle.keys()
        except Exception as e:  # SafetensorError carries no subclass worth telling apart
            raise CheckpointError(f"has a corrupt safetensors header ({str(e).strip()[:160]})",
                                  path=p) from None
        if len(names) + len(infos) > MAX_TENSORS:
            raise CheckpointError(f"holds more than {MAX_TENSORS} tensors; refusing to index it",
                                  path=p)
        metadata.update(handle.metadata() or {})
        for flat, name in strip_prefixes(sorted(names, key=_natural)).items():
            sl = handle.get_slice(name)
            dtype = _DTYPES.get(sl.get_dtype())
            if dtype is None:
                skipped.append(name)
                continue
            infos[flat] = TensorInfo(flat, tuple(int(s) for s in sl.get_shape()), dtype)
            stored[flat] = (handle, name)
    if not infos:
        raise CheckpointError("holds no tensors", path=display)

    def load(key: str) -> torch.Tensor:
        handle, name = stored[key]
        return handle.get_tensor(name)  # type: ignore[attr-defined]

    meta: dict = {"metadata": metadata} if metadata else {}
    if skipped:
        meta["skipped"] = skipped
    return TensorSource(path=display, format=fmt, safe_load=True, infos=infos, loader=load,
                        meta=meta)
