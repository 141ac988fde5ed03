"""Test helpers: a `TensorSource` built straight from an in-memory state dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vqdoctor.checkpoint.base import OPTIMIZER_PREFIX, TensorInfo, TensorSource


def source_from_state_dict(sd: Mapping[str, torch.Tensor], config: dict[str, Any] | None = None,
                           optimizer: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                           path: str = "<state_dict>") -> TensorSource:
    """A `TensorSource` over `sd` (keys kept in order), as a checkpoint reader would build it.

    Args:
        sd: flat name -> tensor map (e.g. `model.state_dict()`).
        config: becomes `meta["config"]`.
        optimizer: param index -> {moment name: tensor}; stored under `@optimizer/0/<index>/<name>`
            with the matching `meta["optimizer"]` entries.
        path: reported path.
    """
    tensors = {k: v.detach() for k, v in sd.items()}
    meta: dict[str, Any] = {}
    if config is not None:
        meta["config"] = config
    if optimizer:
        entries = []
        for index, moments in optimizer.items():
            keys = {}
            for name, t in moments.items():
                keys[name] = f"{OPTIMIZER_PREFIX}0/{index}/{name}"
                tensors[keys[name]] = t.detach()
            shape = tuple(next(iter(moments.values())).shape)
            entries.append({"index": index, "shape": shape, "keys": keys})
        meta["optimizer"] = entries
    infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return TensorSource(path=path, format="test", safe_load=True, infos=infos,
                        loader=tensors.__getitem__, meta=meta)
