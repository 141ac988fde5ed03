"""The normal form every quantizer is turned into, and the adapter contract.

One `QuantizerState` is one codebook (one stage of a residual quantizer, with all its heads).
Residual and grouped quantizers yield one state per stage, tied together by `group` and `stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vqdoctor.checkpoint.base import TensorSource

# What kind of quantizer, as far as diagnosis is concerned.
KINDS = (
    "vq-ema",   # codebook updated by exponential moving averages of assigned vectors
    "vq",       # codebook trained by gradient (codebook / commitment losses)
    "gumbel",   # Gumbel-softmax over a learned codebook
    "simvq",    # frozen base codebook times a learned linear map
    "fsq",      # finite scalar quantization: implicit grid, nothing stored
    "lfq",      # lookup-free quantization: implicit binary codebook
)


@dataclass
class QuantizerState:
    """A quantizer in normal form, read from a checkpoint or a live module.

    All tensors are float32 CPU copies (or views of memory-mapped data); `dtypes` keeps what
    was stored.

    Attributes:
        name: module path / key prefix, e.g. "quantizer.layers.0" ("" for a bare quantizer).
        kind: one of KINDS.
        library: e.g. "vector-quantize-pytorch", "encodec", "transformers", "diffusers",
            "taming-transformers", "rosinality", "zalando", "sonnet", "descript-audio-codec", "generic".
        codebook_size: K.
        dim: D, the code dimension (after any input projection).
        codebook: the *effective* lookup table [H, K, D] (derived for SimVQ; transposed layouts
            fixed; weight-norm resolved), or None for FSQ/LFQ.
        cluster_size: EMA counts [H, K] as stored (None when not an EMA quantizer).
        embed_avg: EMA sums [H, K, D] as stored (None when absent).
        counts_smoothed: True when the stored counts already include Laplace smoothing (zalando).
        ema_rule: how the codebook follows its EMA statistics (`metrics.functional.EMA_RULES`):
            "laplace" (embed_avg / smoothed counts) or "eps-blend" (vector-quantize-pytorch >= 1.34:
            (embed_avg + eps * embed) / (counts + eps), zero-initialised statistics). None: the
            library's only rule, Laplace; set when a library has changed its arithmetic, and then
            reported (`describe`), with where it was read from in `notes`.
        metric: "euclidean" or "cosine" (the lookup compares l2-normalised vectors).
        initted: value of an `initted`/`inited`/`initialized` flag when stored.
        eps: Laplace-smoothing epsilon when known (library default otherwise).
        decay: EMA decay when known from config.
        levels: FSQ levels, when known (from config or the user).
        input_dim: dimension of vectors entering the quantizer (before `project_in`).
        input_heads: number of head slices the (projected) input is split into (lucidrains `heads`).
        project_in: (weight [H*D, input_dim], bias [H*D] or None) of a linear input projection,
            with weight-norm and 1x1 convolutions already resolved; None when there is none.
        group: name of the residual/grouped parent, None for a standalone quantizer.
        stage: index within the group (residual stage), None when standalone.
        dtypes: stored dtype per role, e.g. {"codebook": "float32", "cluster_size": "bfloat16"}.
        keys: source key per role, e.g. {"codebook": "quantizer._codebook.embed"}.
        notes: plain sentences for the user about what could not be read or assumed.
        extra: adapter-specific facts, e.g. {"reset_value": 2.0, "weight_norm": True, "is_parameter": True}.
        optimizer: optimizer moments of the codebook parameter when found, e.g.
            {"exp_avg": [H, K, D], "exp_avg_sq": [H, K, D]}.
    """

    name: str
    kind: str
    library: str
    codebook_size: int
    dim: int
    codebook: torch.Tensor | None = None
    cluster_size: torch.Tensor | None = None
    embed_avg: torch.Tensor | None = None
    counts_smoothed: bool = False
    ema_rule: str | None = None
    metric: str = "euclidean"
    initted: bool | None = None
    eps: float | None = None
    decay: float | None = None
    levels: tuple[int, ...] | None = None
    input_dim: int | None = None
    input_heads: int = 1
    project_in: tuple[torch.Tensor, torch.Tensor | None] | None = None
    group: str | None = None
    stage: int | None = None
    dtypes: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] | None = None

    @property
    def heads(self) -> int:
        """Number of separate codebooks (H) stored for this quantizer."""
        return int(self.codebook.shape[0]) if self.codebook is not None else 1

    @property
    def is_ema(self) -> bool:
        """True when the codebook is updated by EMA statistics."""
        return self.kind == "vq-ema"

    def describe(self) -> dict[str, Any]:
        """JSON-native identity of the quantizer (no tensors)."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "library": self.library,
            "codebook_size": self.codebook_size, "dim": self.dim, "heads": self.heads,
            "metric": self.metric,
        }
        if self.group is not None:
            out["group"] = self.group
            out["stage"] = self.stage
        if self.levels is not None:
            out["levels"] = list(self.levels)
        if self.input_dim is not None:
            out["input_dim"] = self.input_dim
        if self.dtypes:
            out["dtypes"] = dict(self.dtypes)
        if self.initted is not None:
            out["initted"] = self.initted
        if self.ema_rule is not None:
            out["ema_rule"] = self.ema_rule
        return out


class Adapter(Protocol):
    """Finds quantizers of one library family in a `TensorSource`.

    `find` must only read the tensors it turns into a state (`src.get`), must not claim keys in
    `claimed`, and returns states whose `keys` list every key it used.
    """

    name: str

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Return every quantizer of this family found in `src`."""
        ...
