"""VQ011 rank-desync: codebooks differ across data-parallel ranks.

## What it detects
The copies of one codebook held by different data-parallel ranks (per-rank checkpoints, or the
per-rank streams of a run) are not the same. With DDP every rank must hold identical codes;
EMA statistics, k-means init and dead-code replacement are outside autograd, so DDP does not
synchronise them unless the library all-reduces or broadcasts them itself.

## Why it matters
Each rank quantizes with its own codebook, so the same input gets different codes on different
ranks, EMA statistics describe only a 1/world share of the data, and whichever rank's state is
saved describes the model. lucidrains PR #17 ("each replica having different codebooks") and
espnet PR #6284 (broadcasting rank 0 instead of all-reducing) are this bug.

## Signals and thresholds
- `rank_codebook_max_diff` = max |e_rank_i - e_rank_0| / `code_norm_median`: `warning` from
  `warn_diff` (1e-4; all-reduced copies are identical up to float rounding), `error` from
  `error_diff` (1e-2, codes visibly different).
- Run: the same name per cadence step (each rank fingerprints its codebook, a few sampled rows
  and block sums, every `stats_every` steps on the device, compared across ranks offline), so
  the onset is within two cadence steps of the first divergence; onset = first row above
  `warn_diff`, held `sustain_steps` (2) rows; severity from the largest value since.
Confidence 0.9 (a direct comparison; 0.7 below `error_diff`, where ranks saved at different
steps could explain it).

## Fix
1. All-reduce EMA statistics every step (lucidrains `sync_codebook=True`; espnet PR #6284).
2. Make k-means init and dead-code replacement rank-synchronous: compute on gathered samples or
   broadcast from rank 0 (lucidrains PR #17; `sync_kmeans`).
3. Learnable codebooks: make sure DDP owns the parameter so its gradient is all-reduced
   (lucidrains #222).

## References
- lucidrains/vector-quantize-pytorch PR #17, #25, #105, #51, #222
- espnet/espnet PR #6284 (codec DDP logic and dead-code revival)
- facebookresearch/encodec #16 (custom all-reduce instead of DDP broadcasting)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ011", id="rank-desync",
                title="Codebooks differ across data-parallel ranks",
                explains=("dead-codes", "index-collapse"), doc=__doc__)


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ011."""

    warn_diff: float = 1e-4
    error_diff: float = 1e-2
    sustain_steps: int = 2


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose per-rank codebooks differ."""
    world = ev.run.get("world_size")
    for q in ev.quantizers:
        h = S.judge(q, "rank_codebook_max_diff", lambda v: v >= p.warn_diff, p.sustain_steps,
                    at_end=False)
        if h is None:
            continue
        error = h.worst >= p.error_diff
        evidence = {"rank_codebook_max_diff": h.worst, "rank_codebook_max_diff_last": h.last}
        if world is not None:
            evidence["world_size"] = world
        yield SPEC.finding(
            severity=Severity.ERROR if error else Severity.WARNING,
            confidence=0.9 if error else 0.7, quantizer=q.name, step=h.step,
            message=f"codebooks differ across ranks by up to {h.worst:.3g} x the median code norm",
            evidence=evidence,
            fix="All-reduce EMA statistics every step (sync_codebook=True), and run k-means init and "
                "dead-code replacement on all ranks together or broadcast them from rank 0.")
