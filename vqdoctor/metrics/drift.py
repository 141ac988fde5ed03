"""Drift metrics: one quantizer across successive checkpoints, or across data-parallel ranks.

The DRIFT names of `metrics.names`. A codebook that never moves (frozen), counts that never
change, dead codes that accumulate, and ranks whose codebooks disagree are all invisible in a
single checkpoint.
"""

from __future__ import annotations

import math

import torch

from vqdoctor.metrics import functional as F
from vqdoctor.metrics.codebook import DEAD_REL
from vqdoctor.quantizers.base import QuantizerState


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype-independent bits: NaN == NaN here, unlike `torch.equal`."""
    if a.shape != b.shape:
        return False
    a, b = a.detach().to(torch.float32).contiguous(), b.detach().to(torch.float32).contiguous()
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def unchanged_rows(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor | None:
    """`[H * K]` rows finite in both tables and bit-identical between them; None when the shapes differ."""
    if first.shape != last.shape:
        return None
    a, b = F.as_hkd(first.detach()), F.as_hkd(last.detach())
    a = a.reshape(-1, a.shape[-1]).to(torch.float32).contiguous()
    b = b.reshape(-1, b.shape[-1]).to(torch.float32).contiguous()
    ok = torch.isfinite(F.row_norms(a)) & torch.isfinite(F.row_norms(b))
    return (a.view(torch.int32) == b.view(torch.int32)).all(-1) & ok


def rows_unchanged(first: torch.Tensor, last: torch.Tensor) -> dict[str, float]:
    """rows_unchanged_fraction and moved_rows_norm_ratio of two same-shaped tables.

    An optimizer step moves every row that has a gradient (or momentum from one), so a row of a
    gradient-trained codebook that kept its exact bits between two checkpoints received no
    gradient in between: it was never selected (the codebook loss reaches selected rows only).
    The rows that did move are the codes in use; their median norm over that of the unchanged
    rows (still where they were initialised) says how far the data sit from the init scale.
    """
    a, b = F.as_hkd(first.detach()), F.as_hkd(last.detach())
    a = a.reshape(-1, a.shape[-1]).to(torch.float32).contiguous()
    b = b.reshape(-1, b.shape[-1]).to(torch.float32).contiguous()
    norms = F.row_norms(b)
    ok = torch.isfinite(F.row_norms(a)) & torch.isfinite(norms)
    if not bool(ok.any()):
        return {}
    same = (a.view(torch.int32) == b.view(torch.int32)).all(-1) & ok
    out = {"rows_unchanged_fraction": float(same[ok].double().mean())}
    moved = ok & ~same
    if bool(same.any()) and bool(moved.any()):
        still = float(norms[same].median())
        if still > 0:
            out["moved_rows_norm_ratio"] = float(norms[moved].median()) / still
    return out


def _dead_fraction(counts: torch.Tensor) -> float | None:
    """Head-averaged dead fraction (same definition as `codebook_metrics`)."""
    c = F.as_hk(counts.detach())
    vals = []
    for row in c:
        fin = row[torch.isfinite(row)]
        if fin.numel():
            vals.append(float(F.dead_mask(fin, DEAD_REL).double().mean()))
    return sum(vals) / len(vals) if vals else None


def drift_metrics(states: list[QuantizerState]) -> dict[str, float]:
    """DRIFT metrics of one quantizer over checkpoints, oldest first.

    - drift_checkpoints = len(states).
    - with >= 2 codebooks of one shape: codebook_rms_change = sqrt(mean((e_last - e_first)^2)),
      codebook_rel_change = |e_last - e_first|_F / |e_first|_F (elements finite in both;
      omitted when the first table is all zero), codebook_frozen = 1 when every checkpoint's
      codebook is bit-identical to the first, rows_unchanged_fraction = share of rows (finite in
      both) bit-identical between the first and the last, and when some rows moved and some did
      not, moved_rows_norm_ratio = median norm of the moved rows / that of the unchanged ones
      (both in the last checkpoint).
    - with >= 2 count vectors of one shape: counts_frozen (bit-identical), dead_fraction_first,
      dead_fraction_delta = dead_fraction(last) - dead_fraction(first).

    Args:
        states: the same quantizer read from successive checkpoints.

    Returns:
        metric name -> finite float.
    """
    out: dict[str, float] = {"drift_checkpoints": float(len(states))}
    cbs = [s.codebook for s in states if s.codebook is not None]
    if len(cbs) >= 2 and all(c.shape == cbs[0].shape for c in cbs):
        first, last = cbs[0].detach().to(torch.float64), cbs[-1].detach().to(torch.float64)
        ok = torch.isfinite(first) & torch.isfinite(last)
        if ok.any():
            diff = (last - first)[ok]
            out["codebook_rms_change"] = float(diff.pow(2).mean().sqrt())
            base = float(torch.linalg.vector_norm(first[ok]))
            if base > 0:
                out["codebook_rel_change"] = float(torch.linalg.vector_norm(diff)) / base
        out["codebook_frozen"] = 1.0 if all(_bit_identical(cbs[0], c) for c in cbs[1:]) else 0.0
        out.update(rows_unchanged(cbs[0], cbs[-1]))
    counts = [s.cluster_size for s in states if s.cluster_size is not None]
    if len(counts) >= 2 and all(c.shape == counts[0].shape for c in counts):
        out["counts_frozen"] = 1.0 if all(_bit_identical(counts[0], c) for c in counts[1:]) else 0.0
        d0, d1 = _dead_fraction(counts[0]), _dead_fraction(counts[-1])
        if d0 is not None:
            out["dead_fraction_first"] = d0
            if d1 is not None:
                out["dead_fraction_delta"] = d1 - d0
    return {k: v for k, v in out.items() if math.isfinite(v)}


def rank_difference(states: list[QuantizerState]) -> dict[str, float]:
    """How far the same quantizer's codebook differs between data-parallel ranks (or files).

    rank_codebook_max_diff = max_{r, i} |e^(r)_i - e^(0)_i| / median_i |e^(0)_i|: the largest
    displacement of one code on any rank relative to rank 0, in units of rank 0's median code
    norm (non-zero finite rows). 0 when all ranks hold bit-identical codebooks; rows non-finite
    on either side are skipped.

    Args:
        states: the same quantizer from each rank's checkpoint, rank 0 first.

    Returns:
        {"rank_codebook_max_diff": value} when at least two same-shaped codebooks are given,
        else {}.
    """
    cbs = [s.codebook for s in states if s.codebook is not None]
    if len(cbs) < 2 or any(c.shape != cbs[0].shape for c in cbs):
        return {}
    ref = F.as_hkd(cbs[0].detach()).to(torch.float64)
    ref_ok = torch.isfinite(ref).all(-1)
    norms = F.row_norms(ref)[ref_ok]
    norms = norms[norms > 0]
    worst = 0.0
    for c in cbs[1:]:
        x = F.as_hkd(c.detach()).to(torch.float64)
        ok = ref_ok & torch.isfinite(x).all(-1)
        if ok.any():
            worst = max(worst, float(torch.linalg.vector_norm(x - ref, dim=-1)[ok].max()))
    if worst == 0.0:
        return {"rank_codebook_max_diff": 0.0}
    if norms.numel() == 0:
        return {}
    return {"rank_codebook_max_diff": worst / float(norms.median())}
