"""VQ009 codebook-redundancy: duplicate codes, or a codebook spanning a tiny subspace.

## What it detects
Two kinds of wasted capacity in a stored codebook:
1. **duplicates**: codes closer to another code than 1% of the median inter-code distance.
   Rows collapsed to ~0 (dead EMA codes drifting to the origin) are all duplicates of each
   other; they are subtracted here and left to `dead-codes`. With EMA counts the metric already
   needs a *live* code as the other code: dead rows that are still shrinking towards the origin
   together (above the ~0 cut-off) are dead codes, not redundant ones, while a dead row on top of
   a live one counts (it is the wasted copy).
2. **dimensional collapse**: the codebook's effective rank (exp of the entropy of its
   normalised singular values) a tiny fraction of min(K, D).

## Why it matters
Of a set of duplicates only one can win the argmin, so the rest are dead weight that look
alive by norm. Dimensional collapse limits what the codes can express: "Continuous First,
Discrete Later" (arXiv 2605.06870) measured VQGAN codebooks with an effective dimension of 3-5
whatever K, and raised it to 17-19 with an autoencoder warm-up (rFID -17 to -35%).

## Signals and thresholds
- `duplicate_fraction` - `zero_row_fraction`: `warning` from `duplicate_warn` (0.05), `error`
  from `duplicate_error` (0.25). A gradient-trained codebook read over two checkpoints or a run
  treats the rows never selected (bit for bit unchanged) as EMA counts treat dead rows: a tiny
  uniform(+-1/K) init packs its untouched rows together (dead codes, not redundancy), while an
  untouched copy of a code in use is the wasted duplicate. With EMA counts, duplicates of dead rows among themselves are
  not counted (`metrics.names`: duplicate_fraction).
- `effective_rank_fraction` (= `effective_rank` / min(K, D)) <= `effective_rank_warn` (0.05):
  `warning` only (data on a low-dimensional manifold can justify a low rank), confidence 0.5.
Run: the same names per step, sustained `sustain_steps` (3) rows and true at the end.
Not applied to FSQ/LFQ (their grids are fixed). Confidence 0.8 for duplicates.

## Fix
1. Duplicates: sample replacement vectors without repetition and add small noise, use
   k-means++ init (distinct centroids), or add an orthogonality regulariser
   (lucidrains `orthogonal_reg_weight`).
2. Dimensional collapse: train as a plain autoencoder before turning quantisation on
   (arXiv 2605.06870; DistSup enforces the bottleneck from epoch 3), lower the code dimension
   (factorized codes) or l2-normalise codes.

## References
- "Continuous First, Discrete Later" (arXiv 2605.06870): dimensional collapse of VQ codebooks
- Lancucki et al. 2020 (arXiv 2005.08520): delayed quantisation, k-means re-estimation
- Yu et al. 2021, ViT-VQGAN (arXiv 2110.04627): factorized, l2-normalised codes
- lucidrains/vector-quantize-pytorch #13 (replacement samples come from the current batch)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ009", id="codebook-redundancy",
                title="Duplicate codes or a codebook spanning a tiny subspace",
                explains=("dead-codes", "index-collapse"), doc=__doc__)


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ009."""

    duplicate_warn: float = 0.05
    duplicate_error: float = 0.25
    effective_rank_warn: float = 0.05
    sustain_steps: int = 3


def _duplicates(q: QuantizerEvidence, p: Params) -> S.Hit | None:
    dup, zero = S.qcol(q, "duplicate_fraction"), S.qcol(q, "zero_row_fraction")
    if dup is not None:
        net = (dup - zero.reindex(dup.index).fillna(0)).clip(lower=0) if zero is not None else dup
        step = S.onset(net >= p.duplicate_warn, p.sustain_steps)
        return None if step is None else S.Hit(step, float(net.iloc[-1]), float(net.max()))
    if (d := q.m("duplicate_fraction")) is None:
        return None
    net = max(0.0, d - q.m("zero_row_fraction", 0.0))
    return S.Hit(None, net, net) if net >= p.duplicate_warn else None


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer with redundant codes (duplicates first)."""
    for q in ev.quantizers:
        if q.kind in ("fsq", "lfq"):
            continue
        K, D = q.codebook_size, q.dim
        if h := _duplicates(q, p):
            yield SPEC.finding(
                severity=Severity.ERROR if h.last >= p.duplicate_error else Severity.WARNING,
                confidence=0.8, quantizer=q.name, step=h.step,
                message=f"{round(h.last * K):,}/{K:,} codes duplicate another code ({h.last:.1%}, "
                        "rows at ~0 excluded)",
                evidence={"duplicate_fraction_net": h.last,
                          "duplicate_fraction": S.latest(q, "duplicate_fraction"),
                          "zero_row_fraction": S.latest(q, "zero_row_fraction", 0.0)},
                fix="Sample replacement vectors without repetition and add small noise, use k-means++ "
                    "init, or add an orthogonality regulariser (lucidrains orthogonal_reg_weight).")
        elif h := S.judge(q, "effective_rank_fraction", lambda v: v <= p.effective_rank_warn,
                          p.sustain_steps):
            rank = S.latest(q, "effective_rank", h.last * min(K, D))
            yield SPEC.finding(
                severity=Severity.WARNING, confidence=0.5, quantizer=q.name, step=h.step,
                message=f"codebook spans an effective {rank:.3g} of {min(K, D)} dimensions "
                        f"({h.last:.1%}): dimensional collapse",
                evidence={"effective_rank": rank, "effective_rank_fraction": h.last, "dim": D},
                fix=f"Train as a plain autoencoder before quantising (arXiv 2605.06870), lower the "
                    f"code dimension from {D} (factorized codes) or l2-normalise codes.")
