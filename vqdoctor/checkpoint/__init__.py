"""Safe checkpoint readers: a file or folder -> a lazily read `TensorSource`.

The format is told from the content, never the name. Pickle files are read with the weights-only
unpickler (passed explicitly) and memory-mapped; safetensors through its header. Nothing falls
back to full unpickling: only `trust=True` does that.
"""

from __future__ import annotations

import os

import torch

from vqdoctor.checkpoint.base import OPTIMIZER_PREFIX, TensorInfo, TensorSource
from vqdoctor.checkpoint.containers import pick_container, unwrap
from vqdoctor.checkpoint.folder import find_weights, read_json, shard_paths
from vqdoctor.checkpoint.limits import DEFAULT_MAX_MEMORY, layout, parse_size
from vqdoctor.checkpoint.safetensors_ import open_safetensors
from vqdoctor.checkpoint.sniff import sniff
from vqdoctor.checkpoint.torchfile import load_torch
from vqdoctor.errors import CheckpointError


def open_checkpoint(path: str | os.PathLike[str], *, trust: bool = False,
                    container: str | None = None,
                    max_memory: int | str | None = None) -> TensorSource:
    """Open a checkpoint for inspection without reading its tensor data.

    Args:
        path: a torch.save file (zip or legacy), a safetensors file, a sharded index json, or a
            model folder (Hugging Face / diffusers `save_pretrained`, or one weights file).
        trust: unpickle fully (`weights_only=False`). Runs any code in the file; only for files
            you trust. The result then has `safe_load=False`.
        container: which wrapper to read the weights from, e.g. "ema" (any EMA copy) or an exact
            key such as "model_ema"; None picks the main weights.
        max_memory: memory budget for reading any one tensor (bytes, or a size such as "4GiB";
            default 1 GiB); data the file does not store one-to-one (expanded views, deflated
            members) gets 1/16 of it. See `vqdoctor.checkpoint.limits`.

    Returns:
        The tensors' names, shapes and dtypes; data is read per tensor by `get`.

    Raises:
        InputError: the path is missing or unreadable, or `container` is not in the file.
        CheckpointError: the file is not a readable checkpoint (one-line message naming it).
        UnsafeCheckpointError: a pickle needs globals the weights-only loader refuses.
        MemoryBudgetError: a deflated member or a declared array is over the budget (tensors
            are checked when read, by `TensorSource.get`).
    """
    path = os.fspath(path)
    budget = parse_size(max_memory) if max_memory is not None else DEFAULT_MAX_MEMORY
    kind = sniff(path)
    if kind == "folder":
        src = _open_folder(path, trust=trust, container=container, budget=budget)
    elif kind == "json":
        src = _open_index(path, trust=trust, container=container, budget=budget)
    else:
        src = _open_file(path, kind, trust=trust, container=container, budget=budget)
    src.max_memory = budget
    return src


def _info(key: str, t: torch.Tensor) -> TensorInfo:
    lay = layout(t)
    return TensorInfo(key, tuple(t.shape), t.dtype, stored_bytes=lay.stored_bytes if lay else None,
                      view=lay.view if lay else None, device=t.device.type)


def _open_file(path: str, kind: str, *, trust: bool, container: str | None,
               budget: int = DEFAULT_MAX_MEMORY) -> TensorSource:
    if kind == "safetensors":
        pick_container(path, [], container)  # flat format: only "no container" is valid
        return open_safetensors([path], display=path, fmt="safetensors")
    if kind not in ("torch-zip", "torch-legacy"):
        raise CheckpointError(f"is a {kind} file inside a checkpoint set", path=path)
    obj = load_torch(path, zip_format=kind == "torch-zip", trust=trust, max_memory=budget)
    u = unwrap(obj, path, container)
    tensors = u.tensors
    infos = {k: _info(k, t) for k, t in tensors.items()}
    # detach() makes a view, not a copy: mapped pages stay unread until the data is used.
    return TensorSource(path=path, format=kind, safe_load=not trust, infos=infos,
                        loader=lambda k: tensors[k].detach(), container=u.container, meta=u.meta,
                        max_memory=budget)


def _open_index(path: str, *, trust: bool, container: str | None,
                budget: int = DEFAULT_MAX_MEMORY) -> TensorSource:
    shards = shard_paths(path, read_json(path))
    kinds = [sniff(p) for p in shards]
    if all(k == "safetensors" for k in kinds):
        pick_container(path, [], container)
        return open_safetensors(shards, display=path, fmt="safetensors-sharded")
    parts = [_open_file(p, k, trust=trust, container=container, budget=budget)
             for p, k in zip(shards, kinds, strict=True)]
    owner = {k: s for s in parts for k in s.infos}
    meta: dict = {}
    for s in parts:
        for k, v in s.meta.items():
            meta.setdefault(k, v)
    return TensorSource(path=path, format="torch-sharded", safe_load=all(s.safe_load for s in parts),
                        infos={k: i for s in parts for k, i in s.infos.items()},
                        loader=lambda k: owner[k].get(k), container=parts[0].container, meta=meta,
                        max_memory=budget)


def _open_folder(path: str, *, trust: bool, container: str | None,
                 budget: int = DEFAULT_MAX_MEMORY) -> TensorSource:
    weights = find_weights(path)
    src = open_checkpoint(weights, trust=trust, container=container, max_memory=budget)
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        src.format = "hf-folder"
        try:
            cfg = read_json(cfg_path)
        except CheckpointError:  # a broken config must not hide the weights
            cfg = None
        if isinstance(cfg, dict):
            src.meta["config"] = cfg
    src.meta["weights_file"] = os.path.relpath(weights, path)
    src.path = path
    return src


__all__ = ["OPTIMIZER_PREFIX", "TensorInfo", "TensorSource", "open_checkpoint"]
