"""Safe checkpoint readers: a file or folder -> a lazily read `TensorSource`.

The format is told from the content, never the name. Pickle files are read with the weights-only
unpickler (passed explicitly) and memory-mapped; safetensors through its header. Nothing falls
back to full unpickling: only `trust=True` does that.
"""

from __future__ import annotations

import os

from vqdoctor.checkpoint.base import OPTIMIZER_PREFIX, TensorInfo, TensorSource
from vqdoctor.checkpoint.containers import pick_container, unwrap
from vqdoctor.checkpoint.folder import find_weights, read_json, shard_paths
from vqdoctor.checkpoint.safetensors_ import open_safetensors
from vqdoctor.checkpoint.sniff import sniff
from vqdoctor.checkpoint.torchfile import load_torch
from vqdoctor.errors import CheckpointError


def open_checkpoint(path: str | os.PathLike[str], *, trust: bool = False,
                    container: str | None = None) -> TensorSource:
    """Open a checkpoint for inspection without reading its tensor data.

    Args:
        path: a torch.save file (zip or legacy), a safetensors file, a sharded index json, or a
            model folder (Hugging Face / diffusers `save_pretrained`, or one weights file).
        trust: unpickle fully (`weights_only=False`). Runs any code in the file; only for files
            you trust. The result then has `safe_load=False`.
        container: which wrapper to read the weights from, e.g. "ema" (any EMA copy) or an exact
            key such as "model_ema"; None picks the main weights.

    Returns:
        The tensors' names, shapes and dtypes; data is read per tensor by `get`.

    Raises:
        InputError: the path is missing or unreadable, or `container` is not in the file.
        CheckpointError: the file is not a readable checkpoint (one-line message naming it).
        UnsafeCheckpointError: a pickle needs globals the weights-only loader refuses.
    """
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "folder":
        return _open_folder(path, trust=trust, container=container)
    if kind == "json":
        return _open_index(path, trust=trust, container=container)
    return _open_file(path, kind, trust=trust, container=container)


def _open_file(path: str, kind: str, *, trust: bool, container: str | None) -> TensorSource:
    if kind == "safetensors":
        pick_container(path, [], container)  # flat format: only "no container" is valid
        return open_safetensors([path], display=path, fmt="safetensors")
    if kind not in ("torch-zip", "torch-legacy"):
        raise CheckpointError(f"is a {kind} file inside a checkpoint set", path=path)
    obj = load_torch(path, zip_format=kind == "torch-zip", trust=trust)
    u = unwrap(obj, path, container)
    tensors = u.tensors
    infos = {k: TensorInfo(k, tuple(t.shape), t.dtype) for k, t in tensors.items()}
    # detach() makes a view, not a copy: mapped pages stay unread until the data is used.
    return TensorSource(path=path, format=kind, safe_load=not trust, infos=infos,
                        loader=lambda k: tensors[k].detach(), container=u.container, meta=u.meta)


def _open_index(path: str, *, trust: bool, container: str | None) -> TensorSource:
    shards = shard_paths(path, read_json(path))
    kinds = [sniff(p) for p in shards]
    if all(k == "safetensors" for k in kinds):
        pick_container(path, [], container)
        return open_safetensors(shards, display=path, fmt="safetensors-sharded")
    parts = [_open_file(p, k, trust=trust, container=container) for p, k in zip(shards, kinds, strict=True)]
    owner = {k: s for s in parts for k in s.infos}
    meta: dict = {}
    for s in parts:
        for k, v in s.meta.items():
            meta.setdefault(k, v)
    return TensorSource(path=path, format="torch-sharded", safe_load=all(s.safe_load for s in parts),
                        infos={k: i for s in parts for k, i in s.infos.items()},
                        loader=lambda k: owner[k].get(k), container=parts[0].container, meta=meta)


def _open_folder(path: str, *, trust: bool, container: str | None) -> TensorSource:
    weights = find_weights(path)
    src = open_checkpoint(weights, trust=trust, container=container)
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
