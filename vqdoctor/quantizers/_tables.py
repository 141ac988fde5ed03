"""Helpers for adapters of stored 2-D codebook tables ([K, D], or [D, K] transposed) with EMA siblings.

Used by the taming/diffusers, rosinality, zalando, sonnet and generic adapters: name guards that
keep token embeddings out, orientation from the count vector (or the EMA invariant when the table
is square), and one builder that turns the chosen keys into a `QuantizerState`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import Roles, as_hkd, join
from vqdoctor.quantizers.base import QuantizerState

# A module named like a quantizer: quantize, quantizer, vector_quantizer, vq, vq_vae, codebook, quant2...
_QUANTIZER_NAME = re.compile(r"(?:^|_)(?:quanti[sz](?:e|er|ed|ation)?|vq(?:_?vae)?|codebooks?)(?:_?\d+)?$")
# Token / position tables of language and vision transformers: never codebooks.
_TOKEN_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embed_positions", "shared", "lm_head", "embed_in", "embed_out", "patch_embedding",
    "class_embedding", "position_embedding", "relative_attention_bias",
})
_TOKEN_NAME = re.compile(r"(?:^|_)(?:tok|token|word|vocab|pos|position|segment)s?_?emb")
FLAG_NAMES = ("initted", "inited", "initialized", "initialised")


def looks_quantizer(module: str) -> bool:
    """True when the last component of a module path names a quantizer or a codebook."""
    return bool(_QUANTIZER_NAME.search(module.rsplit(".", 1)[-1]))


def is_token_table(key: str) -> bool:
    """True when any component of `key` names a transformer's token or position embedding."""
    return any(p in _TOKEN_NAMES or _TOKEN_NAME.search(p) for p in key.split("."))


def parent(module: str) -> str:
    """`a.b.c` -> `a.b`; "" for a top-level name."""
    return module.rsplit(".", 1)[0] if "." in module else ""


def under(src: TensorSource, prefix: str) -> list[str]:
    """Keys below `prefix` relative to it (every key when the prefix is empty)."""
    if not prefix:
        return src.keys()
    return [k[len(prefix) + 1:] for k in src.keys() if k.startswith(prefix + ".")]


def shape(src: TensorSource, key: str, ndim: int) -> tuple[int, ...] | None:
    """Shape of a stored floating-point tensor with `ndim` dims, else None."""
    info = src.infos.get(key)
    if info is None or not info.dtype.is_floating_point or len(info.shape) != ndim:
        return None
    return info.shape


def flag_key(src: TensorSource, prefix: str) -> str | None:
    """Key of an `initted`-like flag (at most one element) stored under `prefix`."""
    for name in FLAG_NAMES:
        key = join(prefix, name)
        if key in src.infos and src.infos[key].numel <= 1:
            return key
    return None


def orientation(table: tuple[int, ...], count_len: int) -> str | None:
    """"kd" ([K, D]), "dk" (stored transposed), "square" (K == D == count_len), or None (no match)."""
    rows, cols = table
    if count_len == rows == cols:
        return "square"
    return "kd" if count_len == rows else "dk" if count_len == cols else None


def invariant_orientation(src: TensorSource, table_key: str, sums_key: str) -> str | None:
    """Orientation of a square EMA table from `embed_i ~ embed_avg_i / n_i` (rows vs columns).

    Each code's row (or column) of the sums is a scalar multiple of the table's; fitting that
    scale per row and per column tells which axis indexes the codes. None when both fit (e.g.
    `embed_avg` still equal to `embed` at init) or the data is not finite.
    """
    table, sums = src.get_float(table_key), src.get_float(sums_key)

    def misfit(e: torch.Tensor, a: torch.Tensor) -> float:
        scale = (a * e).sum(1, keepdim=True) / (e * e).sum(1, keepdim=True).clamp_min(1e-30)
        return float((a - scale * e).norm() / a.norm().clamp_min(1e-30))

    rows, cols = misfit(table, sums), misfit(table.t(), sums.t())
    if not (rows == rows and cols == cols) or max(rows, cols) < 1e-4:  # NaN, or both fit
        return None
    return "kd" if rows < 0.1 * cols else "dk" if cols < 0.1 * rows else None


def build(src: TensorSource, name: str, kind: str, library: str, table: str, *,
          transposed: bool = False, counts: str | None = None, sums: str | None = None,
          claim: dict[str, str] | None = None, flag: str | None = None,
          notes: Iterable[str] = (), **fields: object) -> QuantizerState:
    """A state from a stored table ([K, D], [D, K] or [H, K, D]) and its optional EMA siblings.

    Args:
        src: the source.
        name: quantizer name (module path).
        kind: one of `KINDS`.
        library: library name.
        table: key of the codebook table.
        transposed: the (2-D) table and the sums are stored [D, K].
        counts: key of the [K] (or [H, K]) count vector.
        sums: key of the EMA sums table (same orientation as `table`).
        claim: extra role -> key entries that are claimed but not read.
        flag: key of an `initted`-like flag.
        notes: sentences for the user.
        **fields: further `QuantizerState` fields (eps, counts_smoothed, input_dim, extra, ...).
    """
    roles = Roles(src)

    def hkd(role: str, key: str) -> torch.Tensor:
        t = roles.read(role, key)
        return as_hkd((t.t() if transposed else t).contiguous())

    codebook = hkd("codebook", table)
    cluster_size = roles.read("cluster_size", counts).reshape(codebook.shape[:2]) if counts else None
    embed_avg = hkd("embed_avg", sums) if sums else None
    initted = bool(roles.read("initted", flag).bool().any()) if flag else None
    for role, key in (claim or {}).items():
        roles.claim(role, key)
    return QuantizerState(
        name=name, kind=kind, library=library, codebook_size=codebook.shape[1],
        dim=codebook.shape[2], codebook=codebook, cluster_size=cluster_size, embed_avg=embed_avg,
        initted=initted, dtypes=roles.dtypes, keys=roles.keys, notes=list(notes), **fields)
