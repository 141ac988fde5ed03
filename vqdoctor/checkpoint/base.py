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

from vqdoctor.checkpoint.limits import DEFAULT_MAX_MEMORY, check_size, shape_text
from vqdoctor.errors import CheckpointError

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
        stored_bytes: bytes the file stores for it when that is less than its logical size (a
            stride-0 or overlapping view); None when every element is stored once.
        view: "stride-0" or "overlapping" with `stored_bytes`, else None.
        device: "meta" for a tensor saved without data, else "cpu".
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored_bytes: int | None = None
    view: str | None = None
    device: str = "cpu"

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
        max_memory: the memory budget (bytes) a tensor read through `get` may take as float32.
    """

    path: str
    format: str
    safe_load: bool
    infos: dict[str, TensorInfo]
    loader: Callable[[str], torch.Tensor]
    container: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    max_memory: int = DEFAULT_MAX_MEMORY

    def keys(self) -> list[str]:
        """Model tensor keys in file order (optimizer state excluded)."""
        return [k for k in self.infos if not k.startswith(OPTIMIZER_PREFIX)]

    def check(self, key: str) -> None:
        """Refuse, before any data is touched, a tensor that cannot or must not be materialised.

        Raises:
            KeyError: unknown key.
            CheckpointError: a meta tensor (the file stores no data for it).
            MemoryBudgetError: over `max_memory` as float32, or an expanded view over its share.
        """
        info = self.infos[key]
        if info.device == "meta":
            raise CheckpointError(f"tensor {key} {shape_text(info.shape)} is a meta tensor: the file "
                                  "stores its shape but no data (saved from a model on the meta "
                                  "device, before its weights were loaded)", path=self.path)
        check_size(f"tensor {key}", info.shape, info.dtype.itemsize, self.max_memory,
                   stored_bytes=info.stored_bytes, view=info.view, path=self.path,
                   dtype=str(info.dtype).removeprefix("torch."))

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype), after `check`. Raises KeyError for an unknown key."""
        if key not in self.infos:
            raise KeyError(key)
        self.check(key)
        return self.loader(key)

    def get_float(self, key: str) -> torch.Tensor:
        """Read one tensor as float32 (a copy when the stored dtype differs).

        Raises:
            CheckpointError: a complex tensor (casting would drop its imaginary part).
        """
        info = self.infos.get(key)
        if info is not None and info.dtype.is_complex:
            raise CheckpointError(f"tensor {key} {shape_text(info.shape)} is complex "
                                  f"({str(info.dtype).removeprefix('torch.')}); vqdoctor reads "
                                  "real-valued codebooks and statistics", path=self.path)
        t = self.get(key)
        return t.float() if t.is_floating_point() or t.dtype == torch.bool else t.to(torch.float32)
