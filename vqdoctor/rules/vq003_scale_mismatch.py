"""VQ003 scale-mismatch: encoder outputs and codebook live on different scales.

## What it detects
The median norm of the quantizer's inputs `||z||` and the median code norm `||e||` differ by
an order of magnitude or more, *and* the lookup shows it: the inputs sit far outside the
codebook's cloud, or only a few codes are chosen. At initialisation (a `uniform(+-1/K)` codebook,
`||e|| ~ 1e-3`, against unit-scale `z`, as in taming-transformers and diffusers) or drifting
apart during training (commitment too weak, `||z||` growing). For cosine lookups the ratio does
not matter (both sides are normalised), but unbounded growth of `||z||` still does
(lucidrains #26: 22 -> 20000, with a growing loss), so only the growth check applies to them.
A checkpoint holds no encoder outputs: this rule needs a probe (`vqdoctor inspect --probe`) or
a run; without either it stays silent.

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
- Growth (run; cosine lookups, or Euclidean runs without a code norm): `z_norm_median` /
  its running minimum >= `z_growth_warn` (10), `error` from `z_growth_error` (100).
Confidence 0.9 when usage is low, 0.7 on geometry alone, 0.5 with no confirmation column in a run,
0.6 for growth.

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
    """ratio / usage / nti per recorded step (run) or one row indexed [None] (checkpoint probe)."""
    r, K = S.qcol(q, "scale_ratio"), q.codebook_size
    z, c = S.qcol(q, "z_norm_median"), S.qcol(q, "code_norm_median")
    if r is None and z is not None and c is not None:
        r = (z / c.reindex(z.index).ffill()).replace([np.inf, -np.inf], np.nan).dropna()
    if r is not None and len(r := r[r > 0]):
        perp, tokens = S.qcol(q, "perplexity"), S.qcol(q, "tokens")
        n = tokens.reindex(r.index).ffill().fillna(K) if tokens is not None else float(K)
        usage = (perp.reindex(r.index).ffill() / np.minimum(K, n) if perp is not None
                 else S.qcol(q, "usage_window"))
        nti = S.qcol(q, "nearest_to_intercode")
        import pandas as pd  # here, not at module level: see rules/base.py

        return pd.DataFrame({"ratio": r, "usage": np.nan if usage is None else usage.reindex(r.index).ffill(),
                             "nti": np.nan if nti is None else nti.reindex(r.index).ffill()})
    if (rv := q.m("scale_ratio")) is None or rv <= 0:
        return None
    perp, n = q.m("probe_perplexity"), q.m("probe_tokens") or K
    import pandas as pd

    return pd.DataFrame({"ratio": [rv], "usage": [np.nan if perp is None else perp / min(K, n)],
                         "nti": [q.m("nearest_to_intercode", np.nan)]}, index=[None])


def _ratio(q: QuantizerEvidence, p: Params) -> Finding | None:
    f = _signals(q)
    if f is None:
        return None
    far = np.maximum(f["ratio"], 1 / f["ratio"])
    low = f["usage"] < p.low_usage_fraction
    outside = (f["nti"] >= p.nearest_to_intercode_min) & (f["ratio"] > 1)
    unconfirmed = f["usage"].isna().all() and f["nti"].isna().all()  # nothing to confirm with
    mask = (far >= p.warn_ratio) & (low | outside | unconfirmed)
    is_run = f.index[0] is not None
    step = S.onset(mask, p.sustain_steps) if is_run else None
    if (is_run and step is None) or not mask.iloc[-1]:
        return None
    last = f.iloc[-1]
    rv, u, nt = float(last["ratio"]), float(last["usage"]), float(last["nti"])
    conf = 0.5 if unconfirmed else 0.9 if bool(low.iloc[-1]) else 0.7
    evidence = {"scale_ratio": rv, "usage_effective": u, "nearest_to_intercode": nt,
                "z_norm_median": S.latest(q, "z_norm_median"),
                "code_norm_median": S.latest(q, "code_norm_median")}
    if step is not None:
        evidence["scale_ratio_onset"] = float(f.loc[step, "ratio"])
    usage_txt = f"; effective usage {u:.1%}" if np.isfinite(u) else ""
    return SPEC.finding(
        severity=Severity.ERROR if float(far.iloc[-1]) >= p.error_ratio else Severity.WARNING,
        confidence=conf, quantizer=q.name, step=step, fix=_fix(rv),
        evidence={k: v for k, v in evidence.items() if v is not None and np.isfinite(v)},
        message=f"median ||z|| / median ||e|| = {rv:.3g} ({float(far.iloc[-1]):.3g}x apart){usage_txt}")


def _growth(q: QuantizerEvidence, p: Params) -> Finding | None:
    z = S.qcol(q, "z_norm_median")
    if z is None:
        return None
    g = S.ratio_to_running_min(z)
    start = S.onset(g >= p.z_growth_warn, p.sustain_steps)
    if start is None:
        return None
    last = float(g.iloc[-1])
    return SPEC.finding(
        severity=Severity.ERROR if last >= p.z_growth_error else Severity.WARNING, confidence=0.6,
        quantizer=q.name, step=start,
        message=f"input norm grew {last:.3g}x to {z.iloc[-1]:.3g} (median ||z||) from step {start:,}",
        evidence={"z_norm_median": float(z.iloc[-1]), "z_norm_min": float(z.min()), "z_growth": last},
        fix="Bound the encoder output: LayerNorm after project_in (lucidrains "
            "layernorm_after_project_in=True, #26) or a larger commitment weight; the commitment "
            "loss grows with ||z||^2 even when the lookup is scale-invariant.")


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose inputs and codes are on different scales."""
    for q in ev.quantizers:
        if q.kind in ("fsq", "lfq"):
            continue  # fixed grids: the encoder output is bounded (tanh) or sign-quantized
        has_ratio = q.metric != "cosine" and _signals(q) is not None
        f = _ratio(q, p) if has_ratio else _growth(q, p)
        if f is not None:
            yield f
