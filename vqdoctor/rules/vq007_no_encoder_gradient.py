"""VQ007 no-encoder-gradient: the straight-through path is broken; the task gradient misses the encoder.

## What it detects
Run mode only (a checkpoint holds no gradients). The gradient that arrives at the quantizer's
output does not come out at its input: the quantizer returned the code `q` itself (argmin has
no gradient) or a detached tensor instead of `z + (q - z).detach()`. Also the run-wide case of
an encoder that receives no gradient at all while the decoder does.

## Why it matters
Without the straight-through estimator, only the commitment term (if any) reaches the encoder:
it learns to sit on the codes it already hits, never to carry information, and usage collapses.
The loss still falls through the decoder, so nothing looks broken until evaluation.

## Signals and thresholds
- `st_grad_ratio` = |grad at quantizer input| / |grad at its output| (straight-through: ~1):
  `error` when <= `zero_ratio` (1e-6, nothing passes); `warning` when <= `low_ratio` (0.01):
  attenuated, e.g. the rotation trick rescales by ||e||/||z||, so a scale mismatch shrinks it.
- `st_grad_cos` (cosine of those two gradients; ~1 for plain STE, positive for the rotation
  trick): `warning` when |cos| <= `low_cos` (0.1): the input gradient is unrelated to the task
  gradient (only the commitment term reaches the encoder).
- run-wide `grad_norm_encoder` / `grad_norm_decoder` <= `encoder_to_decoder_zero` (1e-6) while
  the decoder gradient is > 0: `error`.
Rows with no gradient at the output are not measured. Conditions must hold `sustain_steps` (5)
recorded rows and still hold at the end (the commitment term can dominate briefly early on).
Confidence 0.9 for a zero ratio or a zero encoder gradient, 0.6 attenuated, 0.5 cosine.

## Fix
1. Return `z_q = z + (q - z).detach()` from the quantizer (not `q`, not `q.detach()`), or use
   the library's output instead of looking codes up yourself.
2. Do not detach the encoder output before the quantizer; check `requires_grad` of the encoder.
3. With the rotation trick, fix the scale mismatch that shrinks the gradient.

## References
- van den Oord et al. 2017 (arXiv 1711.00937): straight-through estimator for VQ-VAE
- Huh et al. 2023 (arXiv 2305.08842): sparse, delayed and inaccurate straight-through estimation
- Fifty et al. 2024 (arXiv 2410.06424): rotation trick (gradient rescaled by ||e||/||z||)
- facebookresearch/encodec #25 (zero commitment gradient in residual layers > 1)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ007", id="no-encoder-gradient",
                title="Straight-through path broken: task gradient does not reach the encoder",
                explains=("dead-codes", "index-collapse"), doc=__doc__)

_FIX = ("Return z_q = z + (q - z).detach() from the quantizer (not q or q.detach()), do not detach "
        "the encoder output before it, and check requires_grad on the encoder.")


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ007."""

    zero_ratio: float = 1e-6
    low_ratio: float = 0.01
    low_cos: float = 0.1
    encoder_to_decoder_zero: float = 1e-6
    sustain_steps: int = 5


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield a finding per quantizer with a broken straight-through path, or one run-wide."""
    k, found = p.sustain_steps, False
    for q in ev.quantizers:
        if q.series is None:
            continue
        ratio, cos = S.qcol(q, "st_grad_ratio"), S.qcol(q, "st_grad_cos")
        if h := S.judge(q, "st_grad_ratio", lambda v: v <= p.zero_ratio, k):
            sev, conf, fix = Severity.ERROR, 0.9, _FIX
            msg = f"no gradient passes the quantizer: input/output gradient ratio {h.last:.2g}"
        elif h := S.judge(q, "st_grad_ratio", lambda v: v <= p.low_ratio, k):
            sev, conf = Severity.WARNING, 0.6
            msg = f"gradient through the quantizer attenuated to {h.last:.2g}x"
            fix = ("A gradient scale or stop in the straight-through path, or the rotation trick "
                   "rescaling by ||e||/||z|| under a scale mismatch: fix the scales; " + _FIX)
        elif h := S.judge(q, "st_grad_cos", lambda v: abs(v) <= p.low_cos, k):
            sev, conf, fix = Severity.WARNING, 0.5, _FIX
            msg = (f"gradient at the quantizer input unrelated to the task gradient "
                   f"(cosine {h.last:.2f}): only the commitment term reaches the encoder")
        else:
            continue
        found = True
        evidence = {"st_grad_ratio": None if ratio is None else float(ratio.iloc[-1]),
                    "st_grad_cos": None if cos is None else float(cos.iloc[-1])}
        yield SPEC.finding(severity=sev, confidence=conf, quantizer=q.name, step=h.step,
                           message=msg, fix=fix,
                           evidence={k: v for k, v in evidence.items() if v is not None})
    f = S.frame(ev.run_series, ["grad_norm_encoder", "grad_norm_decoder"])
    if found or f is None:
        return
    enc, dec = f["grad_norm_encoder"], f["grad_norm_decoder"]
    step = S.onset((dec > 0) & (enc <= p.encoder_to_decoder_zero * dec), k)
    if step is not None:
        yield SPEC.finding(
            severity=Severity.ERROR, confidence=0.9, quantizer=None, step=step,
            message=f"encoder gradient norm {enc.iloc[-1]:.2g} while the decoder's is "
                    f"{dec.iloc[-1]:.3g}",
            evidence={"grad_norm_encoder": float(enc.iloc[-1]), "grad_norm_decoder": float(dec.iloc[-1])},
            fix=_FIX)
