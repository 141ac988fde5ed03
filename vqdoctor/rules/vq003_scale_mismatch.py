"""VQ003 scale-mismatch: encoder outputs and codebook live on different scales.

## What it detects
The median norm of the quantizer's inputs `||z||` and the median code norm `||e||` differ by
an order of magnitude or more, *and* the lookup shows it: the inputs sit far outside the
codebook's cloud, or only a few codes are chosen. At initialisation (a `uniform(+-1/K)` codebook,
`||e|| ~ 1e-3`, against unit-scale `z`, as in taming-transformers and diffusers) or drifting
apart during training (commitment too weak, `||z||` growing). For cosine lookups the ratio does
not matter (both sides are normalised), but unbounded growth of `||z||` still does
(lucidrains #26: 22 -> 20000, with a growing loss), so only the growth check applies to them.
A checkpoint holds no encoder outputs: this rule needs a probe (`vqdoctor inspect --probe`), a
run, or two checkpoints of a gradient-trained codebook (the codes in use moved out to the
data's scale, the rest stayed at their init); otherwise it stays silent.

## Why it matters
With `||z|| >> ||e||` every input is nearer to the codebook's outermost code than to any other,
so a handful of codes take everything and the rest never get a gradient or an EMA update;
with `||z|| << ||e||` all inputs fall to the code nearest the origin. Our toy autoencoder with
the encoder output scaled x0.01 used exactly one code.

## Signals and thresholds
- `scale_ratio` = `z_norm_median / code_norm_median` (probe, run; computed from the two medians
  when only they were recorded): mismatch when `max(r, 1/r)` >= `warn_ratio` (10); `error` from
  `error_ratio` (100), judged on the latest value.
- Confirmation: usage low, `perplexity / min(K, n)` < `low_usage_fraction` (0.1)
  (`probe_perplexity` with `probe_tokens`; run `perplexity` with `tokens`, or `usage_window`),
  or, for `r > 1`, `nearest_to_intercode` >= `nearest_to_intercode_min` (3): the nearest code is
  three typical code spacings away. A ratio far from 1 with healthy usage and geometry is not
  reported; when neither was measured the ratio alone counts, with confidence 0.5.
- Run: the condition must hold `sustain_steps` (3) recorded rows and still hold at the end;
  the onset is the first of those rows.
- Run, transient: a mismatch that held `sustain_steps` rows for `transient_steps` (50) training
  steps or more and then ended is not forgotten. When the run still ends with its usual damage,
  dead codes (`dead_fraction`, else 1 - `usage_window`) >= `damage_dead_fraction` (0.25) or a
  batch perplexity / min(K, n) <= `damage_perplexity_fraction` (0.05), it is a `warning` dated
  at its onset (evidence: when it held and ended, its worst ratio, the damage); after a full
  recovery it is an `info` note. A wrong-scale k-means init the encoder grows out of, or an
  encoder that outgrows an EMA codebook for a few hundred steps, leaves codes dead this way.
- Growth (run; cosine lookups, or Euclidean runs without a code norm): `z_norm_median` /
  its running minimum >= `z_growth_warn` (10), `error` from `z_growth_error` (100); dated where
  the growth began (the smallest ||z|| before the crossing), the crossing step in the evidence;
  it explains the replacement churn beside it (codes left behind faster than they are re-seeded).
- Two checkpoints, or a run (gradient-trained codebooks, Euclidean), when the ratio above is
  not confirmed (the codes in use moved to the data's scale, so the ratio of medians says
  little): `moved_rows_norm_ratio`
  (median norm of the rows that moved between the first and the last checkpoint / that of the
  rows that kept their exact bits, i.e. were never selected) >= `moved_ratio_warn` (5; or <=
  1/5) while `rows_unchanged_fraction` >= `damage_dead_fraction` (0.25): `warning`, confidence
  0.6. Dead codes on a well-scaled codebook read 0.59-1.06 in the zoo; uniform(+-1/K) inits
  under larger inputs 11-204 (Adam moves a code ~lr per step, so it grows with the interval).
Confidence 0.9 when usage is low, 0.7 on geometry alone, 0.5 with no confirmation column in a run;
growth 0.9 while still growing at the end (the latest ||z|| is the largest), 0.6 once it levelled
off; a transient that left damage as the mismatch was while it held (severity from its worst
ratio, 0.9 with low usage then, else 0.7), the recovered note 0.6.

## Fix
1. Initialise the codebook from data (k-means on encoder outputs, `kmeans_init=True`), not from
   a tiny uniform(+-1/K); or at the data scale (axlearn PR #907: `1/sqrt(dim)`, not `1/K`).
2. Put the two on one scale: LayerNorm before the quantizer, or l2-normalised codes and inputs
   (ViT-VQGAN; `use_cosine_sim=True`).
3. If the ratio drifts during training: raise the commitment weight (0.25) or bound the
   encoder output (lucidrains `layernorm_after_project_in=True`).

## References
- lucidrains/vector-quantize-pytorch #26 (input norm 22 -> 20000; LayerNorm fix), #19 (init)
- apple/axlearn PR #907 (codebook init scale)
- Yu et al. 2021, ViT-VQGAN (arXiv 2110.04627): l2-normalised, factorized codes
- Huh et al. 2023 (arXiv 2305.08842): internal codebook covariate shift
- Lancucki et al. 2020 (arXiv 2005.08520): input-norm monitoring, batch-norm before the VQ
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

if TYPE_CHECKING:
    import pandas as pd

SPEC = RuleSpec(code="VQ003", id="scale-mismatch",
                title="Encoder outputs and codebook on different scales (init or drift)",
                explains=("dead-codes", "index-collapse", "loss-divergence"), doc=__doc__)


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ003."""

    warn_ratio: float = 10.0
    error_ratio: float = 100.0
    low_usage_fraction: float = 0.1
    nearest_to_intercode_min: float = 3.0
    sustain_steps: int = 3
    z_growth_warn: float = 10.0
    z_growth_error: float = 100.0
    transient_steps: int = 50
    damage_dead_fraction: float = 0.25
    damage_perplexity_fraction: float = 0.05
    moved_ratio_warn: float = 5.0


def _fix(r: float) -> str:
    if r >= 1:
        return (f"Inputs are {r:.3g}x larger than the codes: initialise the codebook from data (k-means "
                "on encoder outputs, kmeans_init=True) instead of a small uniform(+-1/K) init, or "
                "normalise both sides (LayerNorm before the quantizer, l2-normalised codes); if the "
                "ratio grew in training, raise the commitment weight (0.25).")
    return (f"Codes are {1 / r:.3g}x larger than the inputs, so every input falls to the code nearest "
            "the origin: initialise codes at the data scale (k-means, or 1/sqrt(dim) per axlearn "
            "PR #907), or put LayerNorm before the quantizer.")


def _signals(q: QuantizerEvidence) -> pd.DataFrame | None:
    """ratio / usage / nti per recorded step (run); None without a ratio series."""
    r, K = S.qcol(q, "scale_ratio"), q.codebook_size
    z, c = S.qcol(q, "z_norm_median"), S.qcol(q, "code_norm_median")
    if r is None and z is not None and c is not None:
        r = (z / c.reindex(z.index).ffill()).replace([np.inf, -np.inf], np.nan).dropna()
    if r is None or not len(r := r[r > 0]):
        return None
    perp, tokens = S.qcol(q, "perplexity"), S.qcol(q, "tokens")
    n = tokens.reindex(r.index).ffill().fillna(K) if tokens is not None else float(K)
    usage = (perp.reindex(r.index).ffill() / np.minimum(K, n) if perp is not None
             else S.qcol(q, "usage_window"))
    nti = S.qcol(q, "nearest_to_intercode")
    import pandas as pd  # here, not at module level: see rules/base.py

    return pd.DataFrame({"ratio": r, "usage": np.nan if usage is None else usage.reindex(r.index).ffill(),
                         "nti": np.nan if nti is None else nti.reindex(r.index).ffill()})


def _scalars(q: QuantizerEvidence) -> tuple[float, float, float] | None:
    """(ratio, effective usage, nearest_to_intercode) of a checkpoint probe (NaN: not measured)."""
    if (rv := q.m("scale_ratio")) is None or rv <= 0:
        return None
    K = q.codebook_size
    perp, n = q.m("probe_perplexity"), q.m("probe_tokens") or K
    usage = math.nan if perp is None or not K else perp / min(K, n)
    return rv, usage, q.m("nearest_to_intercode", math.nan)


def _mismatch(ratio, usage, nti, p: Params):
    """(mismatch, usage low, unconfirmed) on floats or on aligned Series alike."""
    far = np.maximum(ratio, 1 / ratio)
    low = usage < p.low_usage_fraction
    outside = (nti >= p.nearest_to_intercode_min) & (ratio > 1)
    unconfirmed = bool(np.all(np.isnan(usage))) and bool(np.all(np.isnan(nti)))  # nothing to confirm with
    return (far >= p.warn_ratio) & (low | outside | unconfirmed), low, unconfirmed


def _finding(q: QuantizerEvidence, p: Params, rv: float, u: float, nt: float, low: bool,
             unconfirmed: bool, step: int | None, extra: dict[str, float] | None = None) -> Finding:
    far = max(rv, 1 / rv)
    conf = 0.5 if unconfirmed else 0.9 if low else 0.7
    evidence = {"scale_ratio": rv, "usage_effective": u, "nearest_to_intercode": nt,
                "z_norm_median": S.latest(q, "z_norm_median"),
                "code_norm_median": S.latest(q, "code_norm_median"), **(extra or {})}
    usage_txt = f"; effective usage {u:.1%}" if np.isfinite(u) else ""
    return SPEC.finding(
        severity=Severity.ERROR if far >= p.error_ratio else Severity.WARNING,
        confidence=conf, quantizer=q.name, step=step, fix=_fix(rv),
        evidence={k: v for k, v in evidence.items() if v is not None and np.isfinite(v)},
        message=f"median ||z|| / median ||e|| = {rv:.3g} ({far:.3g}x apart){usage_txt}")


def _ratio(q: QuantizerEvidence, p: Params) -> Finding | None:
    f = _signals(q)
    if f is None:  # checkpoint (probe): plain floats, no frame
        sc = _scalars(q)
        if sc is None:
            return None
        rv, u, nt = sc
        hit, low, unconfirmed = _mismatch(rv, u, nt, p)
        return _finding(q, p, rv, u, nt, bool(low), unconfirmed, None) if hit else None
    mask, low, unconfirmed = _mismatch(f["ratio"], f["usage"], f["nti"], p)
    step = S.onset(mask, p.sustain_steps)
    if step is not None:
        last = f.iloc[-1]
        return _finding(q, p, float(last["ratio"]), float(last["usage"]), float(last["nti"]),
                        bool(low.iloc[-1]), unconfirmed, step,
                        {"scale_ratio_onset": float(f.loc[step, "ratio"])})
    return _transient(q, p, f, mask)


def _transient(q: QuantizerEvidence, p: Params, f: pd.DataFrame, mask: pd.Series) -> Finding | None:
    """A mismatch that held for `transient_steps` or more and then ended.

    Reported, dated at its onset, when the run still shows what it typically leaves behind
    (dead codes or a collapsed usage: codes the inputs skipped while they were on another
    scale do not come back by themselves); an `info` note when the run recovered.
    """
    ep = S.transient(mask, p.sustain_steps, p.transient_steps)
    if ep is None:
        return None
    held = f.loc[ep.start:ep.end]
    far = np.maximum(held["ratio"], 1 / held["ratio"])
    worst = float(held.loc[far.idxmax(), "ratio"])
    low = bool((held["usage"] < p.low_usage_fraction).any())
    rv_now = float(f["ratio"].iloc[-1])
    damage = S.damage_at_end(q, dead_fraction=p.damage_dead_fraction,
                             perplexity_fraction=p.damage_perplexity_fraction)
    evidence = {"scale_ratio": rv_now, "scale_ratio_worst": worst,
                "scale_ratio_onset": float(f.loc[ep.start, "ratio"]), "mismatch_first_step": ep.start,
                "mismatch_last_step": ep.end, "mismatch_ended_step": ep.ended, "mismatch_steps": ep.steps,
                "z_norm_median": S.latest(q, "z_norm_median"), "code_norm_median": S.latest(q, "code_norm_median"),
                **(damage or {})}
    span = f"from step {ep.start:,} to {ep.end:,}"
    if damage:
        left = (f"{damage['dead_fraction_end']:.0%} of codes are dead" if "dead_fraction_end" in damage
                else f"perplexity is {damage['perplexity_end']:.3g}")
        # judged as the mismatch was while it held: its worst ratio and its confirmation
        sev = Severity.ERROR if max(worst, 1 / worst) >= p.error_ratio else Severity.WARNING
        conf = 0.9 if low else 0.7
        msg = (f"median ||z|| / median ||e|| reached {worst:.3g} ({max(worst, 1 / worst):.3g}x apart) {span}; "
               f"it is {rv_now:.3g} now, but {left} at the end: codes skipped meanwhile did not come back")
        fix = _fix(worst) + " Re-seed the dead codes (k-means or replacement from recent inputs) once the scales match."
    else:
        sev, conf = Severity.INFO, 0.6
        msg = (f"median ||z|| / median ||e|| reached {worst:.3g} {span}, then recovered ({rv_now:.3g} now); "
               "no lasting dead codes or collapse")
        fix = _fix(worst)
    return SPEC.finding(severity=sev, confidence=conf, quantizer=q.name, step=ep.start, message=msg, fix=fix,
                        evidence={k: v for k, v in evidence.items() if v is not None and np.isfinite(v)})


def _growth(q: QuantizerEvidence, p: Params) -> Finding | None:
    z = S.qcol(q, "z_norm_median")
    if z is None:
        return None
    g = S.ratio_to_running_min(z)
    crossed = S.onset(g >= p.z_growth_warn, p.sustain_steps)
    if crossed is None:
        return None
    # the growth began where ||z|| was smallest before it crossed the threshold
    start = S.step_of(z.loc[:crossed].idxmin())
    last = float(g.iloc[-1])
    # still growing at the end (the latest value is the largest): unbounded, not a level it settled at
    growing = float(z.iloc[-1]) >= float(z.max()) * (1 - 1e-9)
    return SPEC.finding(
        severity=Severity.ERROR if last >= p.z_growth_error else Severity.WARNING,
        confidence=0.9 if growing else 0.6,
        quantizer=q.name, step=start,
        message=f"input norm grew {last:.3g}x from {float(z.min()):.3g} (step {start:,}) to {z.iloc[-1]:.3g} "
                f"(median ||z||), {p.z_growth_warn:g}x by step {crossed:,}",
        # inputs running away from the codebook leave codes behind faster than replacement
        # re-seeds them: the churn that follows is this growth's symptom
        evidence={"z_norm_median": float(z.iloc[-1]), "z_norm_min": float(z.min()), "z_growth": last,
                  "z_growth_warn_step": crossed, "explains": ["replacement-churn"]},
        fix="Bound the encoder output: LayerNorm after project_in (lucidrains "
            "layernorm_after_project_in=True, #26) or a larger commitment weight; the commitment "
            "loss grows with ||z||^2 even when the lookup is scale-invariant.")


def _init_scale(q: QuantizerEvidence, p: Params) -> Finding | None:
    """Two checkpoints or a run: the codes in use moved far from the scale of those never selected."""
    moved, still = q.m("moved_rows_norm_ratio"), q.m("rows_unchanged_fraction")
    if q.metric == "cosine" or moved is None or still is None or moved <= 0 or still < p.damage_dead_fraction:
        return None
    if max(moved, 1 / moved) < p.moved_ratio_warn:
        return None
    return SPEC.finding(
        severity=Severity.WARNING, confidence=0.6, quantizer=q.name,
        message=f"the codes that were selected sit at {moved:.3g}x the norm of the {still:.1%} of codes "
                "never selected (bit for bit still at their init): the encoder's outputs are far from the "
                "codebook's initial scale",
        evidence={"moved_rows_norm_ratio": moved, "rows_unchanged_fraction": still},
        fix=_fix(moved))


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose inputs and codes are on different scales."""
    for q in ev.quantizers:
        if q.kind in ("fsq", "lfq"):
            continue  # fixed grids: the encoder output is bounded (tanh) or sign-quantized
        has_ratio = q.metric != "cosine" and (_signals(q) is not None or _scalars(q) is not None)
        f = (_ratio(q, p) if has_ratio else _growth(q, p)) or _init_scale(q, p)
        if f is not None:
            yield f
