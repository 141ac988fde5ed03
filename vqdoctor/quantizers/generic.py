"""The fallback adapter: a stored [K, D] codebook table, with or without EMA-like siblings.

A table is a 2-D float tensor named `embed`, `embedding`, `embeddings`, `codebook`, `codes` or
`code_vectors` (or `weight` of a module named like a codebook / quantizer / embedding). Beside
it (in its module, or the parent module for a `weight`) the adapter looks for a [K] count vector
(`cluster_size`, `counts`, `usage`, `N`, ...) and a [K, D] sum table (`embed_avg`, `embed_sum`,
`ema_w`, `dw`, `z_avg`, ...). With such siblings the table is an EMA codebook. Without them,
it is claimed only when its module is named like a quantizer, so a plain `nn.Embedding` (a
token table, a class embedding) is never taken for a codebook; token-embedding names never are.

`explicit` (in `_explicit`, re-exported here) reads a prefix the user names with `--quantizer`.
"""

from __future__ import annotations

import re

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import join
from vqdoctor.quantizers._explicit import explicit
from vqdoctor.quantizers._tables import (
    build,
    flag_key,
    invariant_orientation,
    is_token_table,
    looks_quantizer,
    orientation,
    parent,
    shape,
)
from vqdoctor.quantizers.base import QuantizerState

EPS = 1e-5  # the common default; the real value is not stored
TABLE_NAMES = ("embed", "embedding", "embeddings", "codebook", "codes", "code_vectors", "table")
COUNT_NAMES = ("cluster_size", "ema_cluster_size", "cluster_usage", "code_usage", "counts",
               "count", "usage", "N", "ema_count", "ema_counts", "embed_count")
SUM_NAMES = ("embed_avg", "embed_sum", "ema_embed", "ema_w", "ema_dw", "dw", "z_avg", "code_avg", "sums",
             "ema_sums", "embed_sums")
_WEIGHT_MODULE = re.compile(r"codebook|quanti[sz]|vq|embed|table|codes")


def _sibling(src: TensorSource, dirs: list[str], names: tuple[str, ...], ndim: int,
             sizes: tuple[int, ...], used: set[str]) -> str | None:
    """First unclaimed float tensor `dir.name` with `ndim` dims whose shape's first dim is in `sizes`."""
    for d in dirs:
        for name in names:
            key = join(d, name)
            found = shape(src, key, ndim)
            if found and key not in used and (found[0] in sizes if ndim == 1 else found == sizes):
                return key
    return None


class GenericAdapter:
    """Finds codebook tables no specific adapter recognised."""

    name = "generic"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Return every generic codebook in `src` not using a key in `claimed`.

        A table with EMA-like siblings, or in a module named like a quantizer, is taken in any
        model. A bare embedding-like table (`embedding.weight`, `table`, ... with no bias beside
        it) in a module with a neutral name (`mid`, `block2`) is taken when it is the only such
        table and no other quantizer was found: in a checkpoint that holds a quantizer at all,
        it is the codebook.
        """
        used, states = set(claimed), []
        for key in src.keys():
            state = self._table(src, key, used)
            if state is not None:
                states.append(state)
                used.update(state.keys.values())
        if not states and not claimed:
            bare = [k for k in src.keys() if k not in used and self._bare_table(src, k)]
            if len(bare) == 1 and not self._vocabulary(src, bare[0]):
                state = self._table(src, bare[0], used, bare=True)
                if state is not None:
                    state.extra["guessed"] = True  # by position alone: live discovery goes by behaviour
                    states.append(state)
        return states

    @staticmethod
    def _vocabulary(src: TensorSource, key: str) -> bool:
        """True when the table has a vocabulary head beside it: another [K, D] tensor or a bias of
        length K elsewhere (a language model's output layer), so it is a token table. A layer
        whose K outputs another layer takes as its input (a [*, K] weight: a decoder's hidden
        width that happens to equal K) is not an output layer."""
        kd = tuple(src.infos[key].shape)
        # the model's tensors only: an optimizer's moments of the table have its shape too
        model = [(k, tuple(src.infos[k].shape)) for k in src.keys() if k != key and k in src.infos]
        consumed = any(len(s) == 2 and s[1] == kd[0] and s != kd for _, s in model)
        return not consumed and any(s == kd or (k.endswith("bias") and s == kd[:1]) for k, s in model)

    @staticmethod
    def _bare_table(src: TensorSource, key: str) -> bool:
        """An embedding-like [K, D] table with no bias beside it (not a Linear / conv weight)."""
        module, leaf = (key.rsplit(".", 1) if "." in key else ("", key))
        kd = shape(src, key, 2)
        if not kd or min(kd) < 2 or is_token_table(key) or not src.infos[key].dtype.is_floating_point:
            return False
        named = leaf in TABLE_NAMES or (leaf == "weight" and bool(_WEIGHT_MODULE.search(module.rsplit(".", 1)[-1])))
        return named and join(module, "bias") not in src.infos

    def _table(self, src: TensorSource, key: str, used: set[str], bare: bool = False) -> QuantizerState | None:
        module, leaf = (key.rsplit(".", 1) if "." in key else ("", key))
        kd = shape(src, key, 2)
        is_weight = leaf == "weight" and bool(_WEIGHT_MODULE.search(module.rsplit(".", 1)[-1]))
        if key in used or not kd or min(kd) < 2 or is_token_table(key) \
                or not (leaf in TABLE_NAMES or is_weight):
            return None
        dirs = [module, parent(module)] if is_weight else [module]
        counts = _sibling(src, dirs, COUNT_NAMES, 1, kd, used)
        way = orientation(kd, src.infos[counts].shape[0]) if counts else "kd"
        sums = _sibling(src, dirs, SUM_NAMES, 2, kd, used)
        if way == "square":
            way = (invariant_orientation(src, key, sums) if sums else None) or "kd"
        quantizer_named = looks_quantizer(module) or looks_quantizer(leaf) \
            or (is_weight and looks_quantizer(parent(module)))
        if not (counts or sums or quantizer_named or bare):
            return None
        ema = bool(counts or sums)
        notes = [f"{key} read by the generic adapter as a {'[D, K]' if way == 'dk' else '[K, D]'} "
                 f"codebook{' with EMA statistics' if ema else ''}"
                 + (" (the checkpoint's only embedding-like table; name the quantizer with --quantizer "
                    "if it is not)" if bare and not ema else "")]
        if ema:
            notes.append(f"Laplace-smoothing eps is not stored: assumed {EPS:g}")
        if kd[0] == kd[1] and way == "kd":
            notes.append(f"{key} is square: [K, D] order assumed")
        flag = next((f for f in (flag_key(src, d) for d in dirs) if f and f not in used), None)
        return build(src, module, "vq-ema" if ema else "vq", "generic", key, transposed=way == "dk",
                     counts=counts, sums=sums, flag=flag, notes=notes, eps=EPS if ema else None)


ADAPTER = GenericAdapter()

__all__ = ["ADAPTER", "GenericAdapter", "explicit"]
