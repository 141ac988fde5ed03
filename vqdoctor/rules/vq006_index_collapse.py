"""VQ006 index-collapse: perplexity / usage collapsed to a handful of codes.

## What it detects
The distribution of assignments concentrated on a few codes: perplexity (the effective number
of codes, `exp(H)`) a tiny fraction of what the codebook and the batch allow, or one code taking
a large share of all inputs. This is usually the *symptom* users see ("perplexity fell to 1-2");
ranking names its mechanism in `caused_by` when another rule found one.

It is the root cause when the quantizer's *inputs* collapsed: a probe whose vectors have no
spread (`z_spread`, ~0: every encoder output is the same point, e.g. a sigmoid / tanh head
saturated by un-normalised inputs) can only ever select one code, whatever the codebook does;
or when they saturated (`z_saturated`, ~1: nearly every component at the bound of a tanh /
sigmoid head), so they take a few corner values and only the codes nearest those are chosen.
The finding then says "encoder outputs collapsed", is an `error`, and explains the dead codes
of the same quantizer (they are dead because one point is all the data there is; ranking puts
`dead-codes` under it, in that case only), as well as replacement churn and duplicate codes.

## Why it matters
A collapsed quantizer passes almost no information: reconstruction and downstream accuracy
stall (the user story stayed at chance, docs/contract.md#the-user-story). Huh et al. 2023
describe the set of assigned codes shrinking continuously as training goes on ("index
collapse", a term from Kaiser et al. 2018).

## Signals and thresholds
Effective perplexity fraction `f = perplexity / min(K, n)` (per-batch perplexity is bounded by
the batch size n, bshall/VectorQuantizedVAE #3), with n = `tokens` (run) or `probe_tokens`
(probe), and n = K for EMA counts (they average many steps):
- `error`: `f` <= `error_perplexity_fraction` (0.01), or perplexity <= `collapsed_perplexity`
  (2, "one or two codes") while `f` <= 0.5, or `top1_share` >= `error_top1_share` (0.5).
- `warning`: `f` <= `warn_perplexity_fraction` (0.05), or `top1_share` >= `warn_top1_share` (0.2).
- a later stage of a residual group whose first stage did not collapse: at most `warning`
  (that stage's capacity is wasted; the model still works through the first stage).
- a top-1 share only counts when it is >= `top1_over_uniform` (10) times the uniform share
  1/min(K, n), so small codebooks are not flagged for being small.
Sources: run `perplexity` (+`tokens`, `top1_share`), sustained `sustain_steps` (3) rows and
true at the end; in a checkpoint, the worst of `perplexity`/`top1_share` of the EMA counts (the
history), `probe_perplexity`/`probe_top1_share` (the current codebook on real inputs), and for
gradient-trained codebooks read from two checkpoints the bound perplexity <= m, m = K x (1 -
`rows_unchanged_fraction`) codes moved (only selected rows get a gradient), with n = K.
Confidence 0.95 counts/run, 0.8 probe, 0.7 unchanged rows.
- Inputs collapsed (root cause): `z_spread` <= `collapsed_input_spread` (1e-3; measured 2e-5
  and 2e-10 in collapsed runs against 0.13-1.0 for working encoders, offset data included) while
  the assignments collapsed as above: `error`, confidence 0.9.
- Inputs saturated (root cause): `z_saturated` >= `saturated_input_share` (0.5: half of the
  input components within 1% of the largest |component|) while the assignments collapsed as
  above: `error`, confidence 0.85. Either input collapse explains the dead codes, the
  replacements that keep re-seeding codes from the same few points and the duplicates they
  leave (`INPUT_COLLAPSE_EXPLAINS`). Tuning split of the
  generated zoo: saturated tanh heads read 0.995-1.0, every other encoder (linear, LayerNorm,
  unsaturated heads) 0.0.

## Fix
Inputs collapsed: the encoder maps everything to one point. Normalise its inputs (raw 0-255
pixels, un-logged power spectra and other large-valued features saturate a bounded head), drop
or re-scale the sigmoid / tanh at its end (or put a LayerNorm before it), check for dead ReLUs
and for inputs that are constant by mistake; then re-initialise the codebook from the repaired
encoder's outputs.

Otherwise it is a symptom: fix the cause named in `caused_by` first. Without one:
1. Check the scale of inputs vs codes with a probe (`vqdoctor inspect --probe`), since one code
   taking most inputs usually means the inputs are far from the codebook.
2. k-means init from encoder outputs; dead-code replacement relative to n/K.
3. Lower the lookup dimension / l2-normalise; rotation trick (Fifty et al. 2024).

## References
- Huh et al. 2023 (arXiv 2305.08842); Kaiser et al. 2018 (arXiv 1803.03382): index collapse
- bshall/VectorQuantizedVAE #3 (perplexity depends on batch size)
- v-iashin/SpecVQGAN #20 (collapse to one code); LatentActionPretraining/LAPA #17
- Zhu et al. 2024, SimVQ (arXiv 2411.02038): VQGAN 65,536 codes at 1.4% utilisation
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ006", id="index-collapse",
                title="Perplexity / usage collapsed to a handful of codes",
                explains=(), doc=__doc__)

# Codebooks moved by gradient steps: rows with unchanged bits were never selected in between.
GRADIENT_KINDS = ("vq", "gumbel")
# What an input collapse explains (the rest of the graph is the rules' static `explains`).
INPUT_COLLAPSE_EXPLAINS = ("dead-codes", "replacement-churn", "codebook-redundancy")


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ006."""

    warn_perplexity_fraction: float = 0.05
    error_perplexity_fraction: float = 0.01
    collapsed_perplexity: float = 2.0
    warn_top1_share: float = 0.2
    error_top1_share: float = 0.5
    top1_over_uniform: float = 10.0
    collapsed_input_spread: float = 1e-3
    saturated_input_share: float = 0.5
    sustain_steps: int = 3


def _levels(perp: np.ndarray, denom: np.ndarray, top1: np.ndarray, p: Params) -> np.ndarray:
    """Per entry: 0 error, 1 warning, 2 fine (NaN = unknown). Plain numpy: a checkpoint passes
    one-element arrays and never needs pandas (~0.3 s and ~23 MiB of `vqdoctor inspect`)."""
    perp, denom, top1 = (np.asarray(a, dtype=float) for a in (perp, denom, top1))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = perp / denom
        top1 = np.where(top1 * denom >= p.top1_over_uniform, top1, np.nan)
        err = (frac <= p.error_perplexity_fraction) | (top1 >= p.error_top1_share) | (
            (perp <= p.collapsed_perplexity) & (frac <= 0.5))
        warn = (frac <= p.warn_perplexity_fraction) | (top1 >= p.warn_top1_share)
    return np.where(err, 0, np.where(warn, 1, 2))


@dataclass
class _Judged:
    level: int
    conf: float
    source: str
    perp: float
    denom: float
    top1: float
    step: int | None


def _run(q: QuantizerEvidence, p: Params) -> _Judged | None:
    """The run series, judged row by row; None when no perplexity was recorded or none collapsed."""
    if (perp := S.qcol(q, "perplexity")) is None:
        return None
    import pandas as pd  # run evidence only: not at module level (see rules/base.py)

    K = q.codebook_size
    tokens = S.qcol(q, "tokens")
    n = tokens.reindex(perp.index).ffill().fillna(K).to_numpy() if tokens is not None else np.full(len(perp), K)
    top1 = S.qcol(q, "top1_share")
    t1 = top1.reindex(perp.index).to_numpy() if top1 is not None else np.full(len(perp), np.nan)
    denom = np.minimum(K, n)
    level = _levels(perp.to_numpy(), denom, t1, p)
    step = S.onset(pd.Series(level <= 1, index=perp.index), p.sustain_steps)
    if level[-1] > 1 or step is None:
        return None
    return _Judged(int(level[-1]), 0.95, "run", float(perp.iloc[-1]), float(denom[-1]), float(t1[-1]), step)


def _checkpoint(q: QuantizerEvidence, p: Params) -> _Judged | None:
    """The worst collapsed scalar source; None when none collapsed."""
    K = q.codebook_size
    sources = []
    for name, top, n, conf in (("perplexity", "top1_share", K, 0.95),
                               ("probe_perplexity", "probe_top1_share", q.m("probe_tokens", K), 0.8)):
        if (v := q.m(name)) is not None:
            sources.append((name, v, min(K, n or K), q.m(top, np.nan), conf))
    unchanged = q.m("rows_unchanged_fraction") if q.kind in GRADIENT_KINDS else None
    if unchanged is not None and unchanged < 1:  # 1: frozen, nothing was selected or moved
        sources.append(("rows_unchanged_fraction", max(1.0, K * (1 - unchanged)), K, np.nan, 0.7))
    judged = []
    for name, perp, denom, top1, conf in sources:
        level = int(_levels(np.array([perp]), np.array([float(denom)]), np.array([top1]), p)[0])
        if level <= 1:
            judged.append(_Judged(level, conf, name, float(perp), float(denom), float(top1), None))
    # EMA counts (history) and a probe (the current codebook) may disagree: the worse wins.
    return min(judged, key=lambda j: (j.level, -j.conf)) if judged else None


def _first_stage_works(q: QuantizerEvidence, ev: Evidence, judged: dict[str, _Judged | None]) -> bool:
    """True for a later stage of a residual group whose first stage did not collapse."""
    if q.group is None or not q.stage:
        return False
    first = [x for x in ev.quantizers if x.group == q.group and x.stage == 0]
    return bool(first) and all(judged.get(x.name) is None for x in first)


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose assignments collapsed onto a few codes."""
    judged = {q.name: (_run(q, p) if S.qcol(q, "perplexity") is not None else _checkpoint(q, p))
              for q in ev.quantizers}
    for q in ev.quantizers:
        j = judged[q.name]
        if j is None:
            continue
        perp, denom, top1 = j.perp, j.denom, j.top1
        evidence: dict[str, Any] = {"perplexity": perp, "perplexity_fraction_effective": perp / denom,
                                    "codebook_size": q.codebook_size, "n_effective": denom,
                                    "source": j.source}
        if np.isfinite(top1):
            evidence["top1_share"] = top1
        top_txt = f"; top code takes {top1:.0%} of assignments" if np.isfinite(top1) else ""
        if j.source == "rows_unchanged_fraction":
            what = (f"at most {perp:,.0f} of {q.codebook_size:,} codes selected since the first checkpoint "
                    f"(the other rows never moved)")
        else:
            what = (f"perplexity {perp:.3g} of {q.codebook_size:,} codes "
                    f"({perp / denom:.2%} of min(K, n)){top_txt}")
        spread, sat = S.latest(q, "z_spread"), S.latest(q, "z_saturated")
        severity, conf = (Severity.ERROR if j.level == 0 else Severity.WARNING), j.conf
        if severity == Severity.ERROR and _first_stage_works(q, ev, judged):
            # a later residual stage on one code while the first stage works: that stage's
            # capacity is wasted, the model is not broken
            severity = Severity.WARNING
            evidence["first_stage_works"] = 1.0
        saturated = sat is not None and sat >= p.saturated_input_share
        if saturated and not (spread is not None and spread <= p.collapsed_input_spread):
            # A bounded head driven into its bounds: the inputs sit on a few corners of a box
            # and only the codes nearest those corners are ever chosen.
            severity, conf = Severity.ERROR, max(conf, 0.85)
            evidence.update(z_saturated=sat, explains=list(INPUT_COLLAPSE_EXPLAINS))
            message = (f"encoder outputs saturated: {sat:.0%} of their components sit at the bound of "
                       f"the head (a tanh / sigmoid driven into its limits): {what}")
            fix = ("The encoder's bounded output head saturates, so its outputs take a few corner "
                   "values and only a few codes are ever nearest: normalise the encoder's inputs, "
                   "lower the gain before the tanh / sigmoid (or put a LayerNorm before it, or drop "
                   "it); then re-initialise the codebook (k-means) from the repaired encoder's outputs.")
        elif spread is not None and spread <= p.collapsed_input_spread:
            # The inputs themselves are (nearly) one point: no codebook can spread them.
            severity, conf = Severity.ERROR, max(conf, 0.9)
            evidence.update(z_spread=spread, explains=list(INPUT_COLLAPSE_EXPLAINS))
            if (zn := S.latest(q, "z_norm_median")) is not None:
                evidence["z_norm_median"] = zn
            message = (f"encoder outputs collapsed to a point (median distance to their mean "
                       f"{spread:.2g} x their norm): {what}")
            fix = ("The encoder maps every input to the same point, so one code takes everything: "
                   "normalise its inputs (raw 0-255 pixels, un-logged spectra and other large-valued "
                   "features saturate a bounded head), drop or re-scale the sigmoid / tanh at its end "
                   "(or normalise before it), check for dead ReLUs and constant inputs; then "
                   "re-initialise the codebook (k-means) from the repaired encoder's outputs.")
        else:
            message = what
            fix = ("A symptom: fix the cause ranked above it (caused_by) first. Without one: "
                   + ("one code takes most inputs, which usually means inputs far from the codebook; "
                      "check scales with a probe (vqdoctor inspect --probe), " if np.isfinite(top1)
                      and top1 >= p.warn_top1_share else "")
                   + "initialise codes from data (k-means), replace dead codes with a threshold relative "
                     "to n/K, lower the lookup dimension or l2-normalise, or use the rotation trick.")
        yield SPEC.finding(severity=severity, confidence=conf, quantizer=q.name, step=j.step,
                           evidence=evidence, fix=fix, message=message)
