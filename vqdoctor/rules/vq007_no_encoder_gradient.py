"""VQ007 no-encoder-gradient: the straight-through path is broken; the task gradient misses the encoder.

## What it detects
In a run, the gradient that arrives at the quantizer's
output does not come out at its input: the quantizer returned the code `q` itself (argmin has
no gradient) or a detached tensor instead of `z + (q - z).detach()`. Also the run-wide case of
an encoder that receives no gradient at all while the decoder does. From checkpoints (which hold
no gradients): an encoder that did not move between two checkpoints of one run while the
decoder did.

## Why it matters
Without the straight-through estimator, only the commitment term (if any) reaches the encoder:
it learns to sit on the codes it already hits, never to carry information, and usage collapses.
The loss still falls through the decoder, so nothing looks broken until evaluation.

## Signals and thresholds
- `st_grad_ratio` = |grad at quantizer input| / |grad at its output|: `error` when <=
  `zero_ratio` (1e-6): nothing passes, whatever sits inside the module. A quantizer whose input
  does not require grad while an encoder that should learn (parameters requiring grad, in a
  stepping optimizer, or with hand-written updates) sits before it records ratio 0
  (`st_input_no_grad`): `vq(z.detach())`. An output that does not require grad while the input
  does records ratio 0 too (`st_output_no_grad`): the looked-up code returned as it is. A
  quantizer the loop calls on its own (`z = enc(x); q = vq(z)`) has the module whose output
  it quantizes as its encoder.
- Where input and output share the code space (`st_code_space` = 1: a VQ / VQ-EMA module with
  no projection or other learned map inside, not an earlier stage of a residual group), the
  input gradient is the output gradient passed through (plain straight-through: identical;
  rotation trick: rotated and scaled by ||e||/||z||) plus the commitment term, which points
  along z - q. `st_grad_task_ratio` = |input gradient without its component along z - q| /
  |output gradient|: ~1 for plain straight-through, 0.2-1 with the rotation trick, exactly 0
  (float noise, < 1e-5) when only the commitment term reaches the input. Broken (`error`) when
  it is <= `low_task_ratio` (0.01) *and* `st_grad_passthrough` = <g_in, g_out> / |g_out|^2 <=
  `low_passthrough` (0.5): a quantizer returning `q` read task ratio 0, passthrough -0.14 ->
  -0.003, cosine -0.75 -> -0.2. The cosine alone does not decide: the rotation trick turns it
  to ~0 when inputs sit far from their codes (lucidrains' default, measured 0.06 on a healthy
  path). `warning` when the ratio is <= `low_ratio` (0.01) with the task part intact:
  attenuated, e.g. the rotation trick under a scale mismatch.
- Elsewhere (cosine-similarity lookups, which divide the input gradient by ||z||; FSQ / LFQ bounds, Gumbel-softmax, DAC in_proj / out_proj, lucidrains project_in /
  project_out, encodec's earlier residual stages) cosine and ratio are not compared: gradients
  at the two ends live in different coordinates, and healthy runs read cosine -0.06 to 0.07
  with ratios 0.4 to 14 there.
- Run-wide `grad_norm_encoder` / `grad_norm_decoder` <= `encoder_to_decoder_zero` (1e-6) while
  the decoder gradient is > 0 (encoder parameters in a stepping optimizer whose `.grad` stays
  None read 0): `error`, unless a quantizer shows an intact passthrough (ratio > `zero_ratio`,
  and passthrough > `low_passthrough` where compared): then the straight-through path works and
  the encoder kills its own gradient (a saturated sigmoid/tanh head: an index-collapse story).
- Two or more checkpoints: `encoder_unchanged_fraction` >= `encoder_unchanged_min` (0.999: every
  encoder weight bit-identical between the first and the last) while `decoder_unchanged_fraction`
  <= `decoder_unchanged_max` (0.5): `warning`, confidence 0.7. An optimizer moves every weight
  that gets a gradient, so the encoder got none, or sits outside the optimizer (also the case
  for an encoder frozen on purpose, e.g. pretrained features: then ignore it).
Rows with no gradient at the output are not measured. Conditions must hold `sustain_steps` (5)
recorded rows and still hold at the end (the commitment term can dominate briefly early on).
Confidence 0.9 for a zero ratio or a zero encoder gradient, 0.8 commitment-only input
gradient, 0.6 attenuated.

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
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

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
    low_task_ratio: float = 0.01
    low_passthrough: float = 0.5
    encoder_to_decoder_zero: float = 1e-6
    encoder_unchanged_min: float = 0.999
    decoder_unchanged_max: float = 0.5
    sustain_steps: int = 5


def _code_space(q: QuantizerEvidence) -> bool:
    # a cosine lookup normalises z inside: its input gradient is the output's over ||z||
    v = S.latest(q, "st_code_space")
    return v is not None and v >= 1 and q.metric != "cosine"


def _intact(q: QuantizerEvidence, p: Params) -> bool:
    """The quantizer passes the task gradient (latest rows), as far as it was measured."""
    ratio = S.latest(q, "st_grad_ratio")
    if ratio is None or ratio <= p.zero_ratio:
        return False
    if _code_space(q) and (pt := S.latest(q, "st_grad_passthrough")) is not None:
        return pt > p.low_passthrough
    return True


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield a finding per quantizer with a broken straight-through path, or one run-wide."""
    k, found = p.sustain_steps, False
    for q in ev.quantizers:
        if q.series is None:
            continue
        ratio, cos, pt = S.qcol(q, "st_grad_ratio"), S.qcol(q, "st_grad_cos"), S.qcol(q, "st_grad_passthrough")
        space = _code_space(q)
        h = None
        if h := S.judge(q, "st_grad_ratio", lambda v: v <= p.zero_ratio, k):
            sev, conf, fix = Severity.ERROR, 0.9, _FIX
            if S.latest(q, "st_input_no_grad") == 1:
                msg = ("the quantizer's input does not require grad: the encoder output is detached "
                       "before it, so the encoder gets no task gradient")
                fix = "Do not detach the encoder output before the quantizer (vq(z), not vq(z.detach())); " + _FIX
            elif S.latest(q, "st_output_no_grad") == 1:
                msg = ("the quantizer's output carries no gradient while its input does: the code is "
                       "returned without the straight-through estimator, so only the commitment term "
                       "reaches the encoder")
                fix = "Return z + (q - z).detach() (not the looked-up code q); " + _FIX
            else:
                msg = f"no gradient passes the quantizer: input/output gradient ratio {h.last:.2g}"
        elif space and (h := _judge_broken(q, p, k)):
            sev, conf, fix = Severity.ERROR, 0.8, _FIX
            msg = (f"straight-through path broken: the gradient at the quantizer's input is the commitment "
                   f"term only (the rest is {h.last:.2g}x the output gradient; passthrough "
                   f"{float(pt.iloc[-1]) if pt is not None else float('nan'):.2g})")
        elif space and (h := S.judge(q, "st_grad_ratio", lambda v: v <= p.low_ratio, k)):
            sev, conf = Severity.WARNING, 0.6
            msg = f"gradient through the quantizer attenuated to {h.last:.2g}x"
            fix = ("A gradient scale or stop in the straight-through path, or the rotation trick "
                   "rescaling by ||e||/||z|| under a scale mismatch: fix the scales; " + _FIX)
        else:
            continue
        found = True
        task = S.qcol(q, "st_grad_task_ratio")
        evidence = {"st_grad_ratio": None if ratio is None else float(ratio.iloc[-1]),
                    "st_grad_task_ratio": None if task is None else float(task.iloc[-1]),
                    "st_grad_cos": None if cos is None else float(cos.iloc[-1]),
                    "st_grad_passthrough": None if pt is None else float(pt.iloc[-1]),
                    "st_code_space": 1.0 if space else 0.0,
                    "st_input_no_grad": S.latest(q, "st_input_no_grad"),
                    "st_output_no_grad": S.latest(q, "st_output_no_grad")}
        yield SPEC.finding(severity=sev, confidence=conf, quantizer=q.name, step=h.step,
                           message=msg, fix=fix,
                           evidence={k: v for k, v in evidence.items() if v is not None})
    if ev.source_kind == "checkpoint":
        yield from _frozen_encoder(ev, p)
        return
    f = S.frame(ev.run_series, ["grad_norm_encoder", "grad_norm_decoder"])
    if found or f is None:
        return
    if any(_intact(q, p) for q in ev.quantizers):
        return  # the quantizers pass the gradient: the encoder stops it itself (saturation)
    enc, dec = f["grad_norm_encoder"], f["grad_norm_decoder"]
    step = S.onset((dec > 0) & (enc <= p.encoder_to_decoder_zero * dec), k)
    if step is not None:
        yield SPEC.finding(
            severity=Severity.ERROR, confidence=0.9, quantizer=None, step=step,
            message=f"encoder gradient norm {enc.iloc[-1]:.2g} while the decoder's is "
                    f"{dec.iloc[-1]:.3g}",
            evidence={"grad_norm_encoder": float(enc.iloc[-1]), "grad_norm_decoder": float(dec.iloc[-1])},
            fix=_FIX)


def _frozen_encoder(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Checkpoints: the encoder's weights did not move between the first and last while the decoder's did."""
    enc, dec = ev.run.get("encoder_unchanged_fraction"), ev.run.get("decoder_unchanged_fraction")
    if enc is None or dec is None or enc < p.encoder_unchanged_min or dec > p.decoder_unchanged_max:
        return
    n = int(ev.run.get("encoder_tensors", 0))
    yield SPEC.finding(
        severity=Severity.WARNING, confidence=0.7, quantizer=None,
        message=f"the encoder did not move between the checkpoints ({n} weight tensor{'s' * (n != 1)} "
                f"bit-identical) while {1 - dec:.0%} of the decoder's weights changed: no gradient reaches "
                f"the encoder, or it is not in the optimizer",
        evidence={"encoder_unchanged_fraction": enc, "decoder_unchanged_fraction": dec, "encoder_tensors": n},
        fix=_FIX + " Check that the optimizer holds the encoder's parameters (unless it is frozen on purpose).")


def _judge_broken(q: QuantizerEvidence, p: Params, k: int) -> S.Hit | None:
    """Only the commitment term at the input, sustained and at the end (rows measuring both)."""
    both = S.where(q.series, ["st_grad_task_ratio", "st_grad_passthrough"],
                   lambda task, pt: (task <= p.low_task_ratio) & (pt <= p.low_passthrough))
    if both is None:
        return None
    start = S.onset(both, k)
    if start is None:
        return None
    task = S.qcol(q, "st_grad_task_ratio")
    assert task is not None
    return S.Hit(step=start, last=float(task.iloc[-1]), worst=float(S.after(task, start).min()),
                 rows=int(both.sum()))
