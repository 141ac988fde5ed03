"""The contract between checkpoint readers and quantizer discovery.

A reader turns a file or folder into a `TensorSource`: a flat, read-only view of tensor *names,
shapes and dtypes*, from which discovery materialises only the tensors it needs (`get`).
Non-tensor content worth keeping (configs, hyper-parameters, step counters, optimizer state
layout) goes into `meta`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Keys under this prefix hold optimizer state, never model weights: `@optimizer/<opt>/<param_index>/<name>`
# (name is e.g. exp_avg, exp_avg_sq, momentum_buffer). Discovery ignores them; metrics match
# them to codebooks by shape.
OPTIMIZER_PREFIX = "@optimizer/"


@dataclass(frozen=True)
class TensorInfo:
    """What is known of one tensor without reading its data.

    Attributes:
        key: flat, unwrapped name (container and `module.`/`_orig_mod.` prefixes removed).
        shape: tensor shape.
        dtype: torch dtype.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class TensorSource:
    """A lazily read checkpoint: names, shapes and dtypes up front, data on demand.

    Attributes:
        path: what was opened (file or folder), as given by the user.
        format: one of "torch-zip", "torch-legacy", "safetensors", "safetensors-sharded", "hf-folder".
        safe_load: True when no code from the file could run (weights-only unpickler or safetensors).
        container: which wrapper the weights came out of, e.g. "state_dict", "model", "ema", or "" for a raw state dict.
        infos: every tensor, by flat key.
        meta: non-tensor content: "config" (dict, e.g. HF config.json or Lightning hyper_parameters),
            "global_step", "epoch", "optimizer" (list of {"index": int, "shape": tuple, "keys": {name: flat key}}),
            "containers" (other wrappers present, e.g. ["ema"]).
        loader: function that materialises one tensor by flat key (CPU, original dtype).
    """

    path: str
    format: str
    safe_load: bool
    infos: dict[str, TensorInfo]
    loader: Callable[[str], torch.Tensor]
    container: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> list[str]:
        """Model tensor keys in file order (optimizer state excluded)."""
        return [k for k in self.infos if not k.startswith(OPTIMIZER_PREFIX)]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype). Raises KeyError for an unknown key."""
        if key not in self.infos:
            raise KeyError(key)
        return self.loader(key)

    def get_float(self, key: str) -> torch.Tensor:
        """Read one tensor as float32 (a copy when the stored dtype differs)."""
        t = self.get(key)
        return t.float() if t.is_floating_point() or t.dtype == torch.bool else t.to(torch.float32)
