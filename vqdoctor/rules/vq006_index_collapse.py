"""VQ006 index-collapse: perplexity / usage collapsed to a handful of codes.

## What it detects
The distribution of assignments concentrated on a few codes: perplexity (the effective number
of codes, `exp(H)`) a tiny fraction of what the codebook and the batch allow, or one code taking
a large share of all inputs. This is the *symptom* users see ("perplexity fell to 1-2"); ranking
names its mechanism in `caused_by` when another rule found one.

## Why it matters
A collapsed quantizer passes almost no information: reconstruction and downstream accuracy
stall (the SPEC's user story stayed at chance). Huh et al. 2023 describe the set of assigned codes
shrinking continuously as training goes on ("index collapse", a term from Kaiser et al. 2018).

## Signals and thresholds
Effective perplexity fraction `f = perplexity / min(K, n)` (per-batch perplexity is bounded by
the batch size n, bshall/VectorQuantizedVAE #3), with n = `tokens` (run) or `probe_tokens`
(probe), and n = K for EMA counts (they average many steps):
- `error`: `f` <= `error_perplexity_fraction` (0.01), or perplexity <= `collapsed_perplexity`
  (2, "one or two codes") while `f` <= 0.5, or `top1_share` >= `error_top1_share` (0.5).
- `warning`: `f` <= `warn_perplexity_fraction` (0.05), or `top1_share` >= `warn_top1_share` (0.2).
- a top-1 share only counts when it is >= `top1_over_uniform` (10) times the uniform share
  1/min(K, n), so small codebooks are not flagged for being small.
Sources: run `perplexity` (+`tokens`, `top1_share`), sustained `sustain_steps` (3) rows and
true at the end; in a checkpoint, the worse of `perplexity`/`top1_share` of the EMA counts (the
history) and `probe_perplexity`/`probe_top1_share` (the current codebook on real inputs).
Confidence 0.95 counts/run, 0.8 probe.

## Fix
It is a symptom: fix the cause named in `caused_by` first. Without one:
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
from typing import TYPE_CHECKING, Any

import numpy as np

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

if TYPE_CHECKING:
    import pandas as pd

SPEC = RuleSpec(code="VQ006", id="index-collapse",
                title="Perplexity / usage collapsed to a handful of codes",
                explains=(), doc=__doc__)


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ006."""

    warn_perplexity_fraction: float = 0.05
    error_perplexity_fraction: float = 0.01
    collapsed_perplexity: float = 2.0
    warn_top1_share: float = 0.2
    error_top1_share: float = 0.5
    top1_over_uniform: float = 10.0
    sustain_steps: int = 3


def _levels(f: pd.DataFrame, p: Params) -> pd.Series:
    """Per row: 0 error, 1 warning, 2 fine; columns perplexity, denom, top1 (NaN = unknown)."""
    import pandas as pd  # not at module level: see rules/base.py

    frac = f["perplexity"] / f["denom"]
    top1 = f["top1"].where(f["top1"] * f["denom"] >= p.top1_over_uniform)
    err = (frac <= p.error_perplexity_fraction) | (top1 >= p.error_top1_share) | (
        (f["perplexity"] <= p.collapsed_perplexity) & (frac <= 0.5))
    warn = (frac <= p.warn_perplexity_fraction) | (top1 >= p.warn_top1_share)
    return pd.Series(np.where(err, 0, np.where(warn, 1, 2)), index=f.index)


def _sources(q: QuantizerEvidence) -> list[tuple[str, pd.DataFrame, float]]:
    """(source, frame of perplexity/denom/top1, confidence): the run series, else every scalar source."""
    import pandas as pd  # not at module level: see rules/base.py

    K = q.codebook_size
    if (perp := S.qcol(q, "perplexity")) is not None:
        tokens = S.qcol(q, "tokens")
        n = tokens.reindex(perp.index).ffill().fillna(K) if tokens is not None else K
        top1 = S.qcol(q, "top1_share")
        return [("run", pd.DataFrame({
            "perplexity": perp, "denom": np.minimum(K, n),
            "top1": top1.reindex(perp.index) if top1 is not None else np.nan}), 0.95)]
    out = []
    for name, top, n, conf in (("perplexity", "top1_share", K, 0.95),
                               ("probe_perplexity", "probe_top1_share",
                                q.m("probe_tokens", K), 0.8)):
        if (v := q.m(name)) is not None:
            out.append((name, pd.DataFrame({"perplexity": [v], "denom": [min(K, n or K)],
                                            "top1": [q.m(top, np.nan)]}), conf))
    return out


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose assignments collapsed onto a few codes."""
    for q in ev.quantizers:
        judged = []
        for source, f, conf in _sources(q):
            level = _levels(f, p)
            step = S.onset(level <= 1, p.sustain_steps) if source == "run" else None
            if level.iloc[-1] <= 1 and (source != "run" or step is not None):
                judged.append((int(level.iloc[-1]), -conf, source, f, step))
        if not judged:
            continue
        # EMA counts (history) and a probe (the current codebook) may disagree: the worse wins.
        lvl, neg_conf, source, f, step = min(judged, key=lambda j: j[:2])
        conf = -neg_conf
        row = f.iloc[-1]
        perp, denom, top1 = float(row["perplexity"]), float(row["denom"]), float(row["top1"])
        evidence: dict[str, Any] = {"perplexity": perp, "perplexity_fraction_effective": perp / denom,
                                    "codebook_size": q.codebook_size, "n_effective": denom,
                                    "source": source}
        if np.isfinite(top1):
            evidence["top1_share"] = top1
        top_txt = f"; top code takes {top1:.0%} of assignments" if np.isfinite(top1) else ""
        fix = ("A symptom: fix the cause ranked above it (caused_by) first. Without one: "
               + ("one code takes most inputs, which usually means inputs far from the codebook; "
                  "check scales with a probe (vqdoctor inspect --probe), " if np.isfinite(top1)
                  and top1 >= p.warn_top1_share else "")
               + "initialise codes from data (k-means), replace dead codes with a threshold relative "
                 "to n/K, lower the lookup dimension or l2-normalise, or use the rotation trick.")
        yield SPEC.finding(
            severity=Severity.ERROR if lvl == 0 else Severity.WARNING, confidence=conf,
            quantizer=q.name, step=step, evidence=evidence, fix=fix,
            message=f"perplexity {perp:.3g} of {q.codebook_size:,} codes "
                    f"({perp / denom:.2%} of min(K, n)){top_txt}")
