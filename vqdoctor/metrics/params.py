"""The model around the quantizers, between two checkpoints of one run: did the encoder move,
did the weights blow up?

A parameter that an optimizer steps changes every step it has a gradient (or momentum), so an
encoder whose every weight is bit-identical in two checkpoints while the decoder's changed got
no update in between: no gradient reached it (straight-through path broken, output detached),
or it was left out of the optimizer. Measured per side by element count, on weights only
(BatchNorm running statistics move in any training-mode forward).

Sides come from names first (a path component starting with `enc` or named `quant_conv`:
encoder; `dec` or `post_quant...`: decoder), else from file order around the quantizer keys
(registration order: encoder, quantizer, decoder).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from vqdoctor.checkpoint.base import TensorSource

STATS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
CHUNK = 1 << 16
"""Leading elements of each tensor compared (256 KiB of float32): an optimizer step moves every
element of a weight it updates, so a prefix tells a moved tensor from an unmoved one, and only
its pages of a memory-mapped checkpoint are read."""
MAX_ELEMENTS = 1 << 25
"""Tensor elements per side at most (tensors past it are skipped): bounds what a reader that
cannot map the file (safetensors, legacy pickles) loads, one tensor at a time."""


def side_of(key: str) -> str | None:
    """'encoder', 'decoder' or None, from the key's path components."""
    for part in key.split(".")[:-1]:
        p = part.lower()
        if p.startswith("post_quant") or p.startswith("dec"):
            return "decoder"
        if p.startswith("enc") or p == "quant_conv":
            return "encoder"
    return None


def _sides(src: TensorSource, excluded: tuple[str, ...]) -> dict[str, list[str]]:
    # meta tensors hold no data and expanded views are not weights an optimizer steps
    keys = [k for k in src.keys() if src.infos[k].dtype.is_floating_point
            and src.infos[k].device != "meta" and src.infos[k].view is None
            and not k.endswith(STATS_SUFFIXES)]
    inside = [i for i, k in enumerate(keys) if k.startswith(excluded)]
    outside = [(i, k) for i, k in enumerate(keys) if not k.startswith(excluded)]
    sides: dict[str, list[str]] = {"encoder": [], "decoder": []}
    named = [(k, side_of(k)) for _, k in outside]
    if any(s is not None for _, s in named):
        for k, s in named:
            if s is not None:
                sides[s].append(k)
    elif inside:
        for i, k in outside:
            sides["encoder" if i < inside[0] else "decoder"].append(k)
    return sides


def _compare(first: TensorSource, last: TensorSource, keys: Iterable[str]) -> dict[str, float] | None:
    """Unchanged share, tensors compared and norm growth of one side; None when nothing compares."""
    same = total = n = 0
    sq_first = sq_last = 0.0
    for k in keys:
        a, b = first.infos.get(k), last.infos[k]
        if a is None or a.shape != b.shape or a.dtype != b.dtype or total + b.numel > MAX_ELEMENTS:
            continue
        x, y = first.get(k).reshape(-1)[:CHUNK], last.get(k).reshape(-1)[:CHUNK]
        if torch.equal(x, y):
            same += b.numel
        sq_first += float(x.double().square().sum())
        sq_last += float(y.double().square().sum())
        total += b.numel
        n += 1
    if not total:
        return None
    out = {"unchanged_fraction": same / total, "tensors": float(n)}
    if sq_first > 0 and math.isfinite(sq_first) and math.isfinite(sq_last):
        out["norm_growth"] = math.sqrt(sq_last / sq_first)
    return out


def param_drift(first: TensorSource, last: TensorSource, quantizer_prefixes: Iterable[str]) -> dict[str, float]:
    """Run-wide metrics from the earliest and the latest checkpoint.

    Returns (each only when that side has weights in both checkpoints):
        encoder_unchanged_fraction / decoder_unchanged_fraction: share of the side's weight
            elements held in tensors that are bit-identical between the two checkpoints.
        encoder_tensors / decoder_tensors: how many tensors were compared.
        encoder_norm_growth / decoder_norm_growth: L2 norm of the side's weights (the compared
            prefixes), last / first (only when both are finite and the first is non-zero).
    """
    excluded = tuple(p + "." for p in quantizer_prefixes if p)
    out: dict[str, float] = {}
    for side, keys in _sides(last, excluded).items():
        for name, value in (_compare(first, last, keys) or {}).items():
            out[f"{side}_{name}"] = value
    return out
