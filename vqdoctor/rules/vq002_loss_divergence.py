"""VQ002 loss-divergence: the training loss grows exponentially, or gradient norms spike.

## What it detects
In a run: the training loss rising by orders of magnitude above its running minimum while
still growing (it keeps at least doubling within a short window), a single optimizer step that
blows the loss or the encoder output up several times over (even when training recovers), or
the encoder / decoder gradient norm jumping far above its recent median. Checkpoints carry no loss history; from two
or more checkpoints of one run it reads what diverging steps leave behind: encoder or decoder
weights whose norm grew several times over between the first and the last.

## Why it matters
A diverging optimisation drags the encoder outputs to huge norms, which pushes every input to the
same code (dead codes, index collapse) and ends in NaN/Inf. The user story
(docs/contract.md#the-user-story) ended at a loss of 1e13. The usual causes are a learning rate too
high for the quantizer's losses, no (or ineffective) gradient clipping, and a commitment term that
grows with `||z||` (lucidrains/vector-quantize-pytorch #26, #27, #69).

## Signals and thresholds
- `loss` (run-wide): ratio to its running minimum (over positive values) >= `warn_ratio` (10)
  while it still grows: loss >= `growth_factor` (2) x the smallest of the previous
  `growth_window` (10) recorded rows. Sustained for `sustain_steps` (3) rows; the onset is the
  first row. `error` when the ratio reaches `error_ratio` (1e3) *while still growing*, or the
  loss turns non-finite after the onset; `warning` when it is still growing at the end of the
  run. A rise that stopped below `error_ratio` is not reported: a linear loss-weight warm-up
  looks like that (a ramp stops doubling per window quickly), exponential growth does not.
- `grad_norm_encoder`, `grad_norm_decoder` (run-wide): a row >= `grad_spike_factor` (100) x the
  median of the previous `grad_median_window` (20) rows is a spike; `error` from
  `grad_spike_error_count` (3) spikes on, `warning` below.
- `loss` jump (run-wide): a row >= `jump_factor` (5) x the median of the previous
  `growth_window` rows: an optimizer step that blew the model up (a learning-rate spike, a bad
  batch through an unclipped step), even when the loss recovers afterwards. `warning`,
  confidence 0.6. Tuning split of the generated zoo: healthy runs' largest jump 1.11x, the
  learning-rate spikes 6.9-232x.
- `z_norm_median` jump (per quantizer, cadence rows): the encoder output's median norm >=
  `z_jump_factor` (10) x its previous row: the encoder weights took a diverging step, which the
  loss can hide (a cosine-similarity lookup normalises z, so the loss barely moves). `warning`,
  confidence 0.6. Tuning split: healthy runs up to 2.9x between rows, spikes 11-42x. A slow
  drift of ||z|| is scale-mismatch (VQ003), not this; after a jump, the input-norm growth is
  its symptom, and so is a gradient that no longer passes where the inputs now sit (FSQ / LFQ
  bounds saturated) (`evidence["explains"]`).
- Two or more checkpoints: `encoder_norm_growth` or `decoder_norm_growth` (L2 norm of the side's
  weights, last / first) >= `weight_growth_warn` (5): `warning`, confidence 0.6. Healthy zoo
  runs read 0.97-1.5 (up to 2.8 with a scale mismatch); a learning rate 100x too high for 50
  of 150 steps read 9.3 and 12.8.
All thresholds are ratios of a quantity to its own history, so no loss scale is assumed.
Confidence 0.85 for error-level loss growth, 0.6 for a still-elevated loss, 0.5 for spikes alone.

## Fix
1. Lower the learning rate (10x is a fair first try) and add an LR warm-up.
2. Clip gradients (`clip_grad_norm_(params, 1.0)`); note that clipping hides spikes from the
   optimizer but not their cause.
3. If the growing term is the commitment loss and `||z||` grows, bound the encoder output
   (LayerNorm after `project_in`, lucidrains #26) or raise the commitment weight (0.25).
4. Keep the quantizer in float32 under AMP; find the first bad op with anomaly detection.

## References
- lucidrains/vector-quantize-pytorch #26 (input norm 22 -> 20000, growing loss), #27, #69, #238
- lucidrains/meshgpt-pytorch #32 (commit loss rising is sometimes benign)
- facebookresearch/AudioDec #38 (vq_loss rises then fluctuates)
- van den Oord et al. 2017 (arXiv 1711.00937): commitment beta 0.25
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ002", id="loss-divergence",
                title="Loss or gradient norms growing exponentially or spiking",
                explains=("non-finite", "scale-mismatch", "dead-codes", "index-collapse"),
                doc=__doc__)


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ002."""

    warn_ratio: float = 10.0
    error_ratio: float = 1e3
    growth_factor: float = 2.0
    growth_window: int = 10
    sustain_steps: int = 3
    grad_spike_factor: float = 100.0
    grad_median_window: int = 20
    grad_spike_error_count: int = 3
    weight_growth_warn: float = 5.0
    jump_factor: float = 5.0
    z_jump_factor: float = 10.0


def _loss(ev: Evidence, p: Params) -> tuple[Severity, float, int, dict[str, Any]] | None:
    raw = S.column(ev.run_series, "loss", finite=False)
    if raw is None:
        return None
    loss = raw.dropna()  # +Inf stays: a loss that overflows has diverged
    finite = loss[np.isfinite(loss.to_numpy())]
    if not len(finite):
        return None
    ratio = S.ratio_to_running_min(loss)
    diverging = (ratio >= p.warn_ratio) & (S.growth(loss, p.growth_window) >= p.growth_factor)
    start = S.first_sustained(diverging, p.sustain_steps)
    if start is None:
        return None
    tail_ratio = S.after(ratio, start)
    fin_ratio = tail_ratio[np.isfinite(tail_ratio.to_numpy())]
    worst = float(fin_ratio.max()) if len(fin_ratio) else float("inf")
    evidence: dict[str, Any] = {
        "loss_min": float(finite[finite > 0].min()), "loss_max_finite": float(finite.max()),
        "loss_ratio_max": worst, "loss_ratio_last": float(ratio.iloc[-1]), "loss_onset_step": start,
        "loss_log_slope_per_step": S.log_slope(S.after(finite, start))}
    tail = S.after(raw, start)
    v = tail.to_numpy()
    bad = [S.step_of(tail.index[int(np.flatnonzero(np.isinf(v))[0])])] if np.isinf(v).any() else []
    if np.isnan(v[-1]):  # ends in NaN: the first row of that trailing NaN run
        fin = np.flatnonzero(np.isfinite(v))
        bad.append(S.step_of(tail.index[int(fin[-1]) + 1 if len(fin) else 0]))
    if bad:
        evidence["loss_nonfinite_step"] = min(b for b in bad if b is not None)
    if bool((diverging & (ratio >= p.error_ratio)).any()) or bad:
        return Severity.ERROR, 0.85, start, evidence
    if S.holds_at_end(diverging):
        return Severity.WARNING, 0.6, start, evidence
    return None


def _spikes(ev: Evidence, p: Params) -> tuple[int, int | None, dict[str, Any]]:
    total, first, evidence = 0, None, {}
    for name in ("grad_norm_encoder", "grad_norm_decoder"):
        g = S.column(ev.run_series, name)
        if g is None:
            continue
        hit = S.spikes(g, p.grad_spike_factor, p.grad_median_window)
        if hit.any():
            n, s = int(hit.sum()), S.step_of(hit[hit].index[0])
            factor = float((g / S.prior_median(g, p.grad_median_window))[hit].max())
            evidence |= {f"{name}_spikes": n, f"{name}_first_spike_step": s,
                         f"{name}_spike_factor_max": factor}
            total += n
            first = s if first is None or (s is not None and s < first) else first
    return total, first, evidence


def _jumps(ev: Evidence, p: Params) -> tuple[int | None, dict[str, Any], list[str]]:
    """The first loss jump and encoder-output norm jump, with their evidence and message parts."""
    first, evidence, parts = None, {}, []
    loss = S.column(ev.run_series, "loss")
    if loss is not None and len(loss) > p.growth_window // 2:
        base = S.prior_median(loss, p.growth_window)
        hit = (base > 0) & (loss >= p.jump_factor * base)
        if hit.any():
            step = S.step_of(hit[hit].index[0])
            factor = float((loss / base)[hit].max())
            evidence |= {"loss_jump_factor": factor, "loss_jump_step": step,
                         "loss_last_to_min": float(S.ratio_to_running_min(loss).iloc[-1])}
            parts.append(f"the loss jumped {factor:.3g}x above its recent median at step {step:,}")
            first = step
    for q in ev.quantizers:
        z = S.qcol(q, "z_norm_median")
        if z is None or len(z) < 2:
            continue
        prev = z.shift(1)
        hit = (prev > 0) & (z >= p.z_jump_factor * prev)
        if hit.any():
            step = S.step_of(hit[hit].index[0])
            factor = float((z / prev)[hit].max())
            # the jump is the divergence: the input-norm growth it leaves is its symptom, and so
            # is a gradient that stops where the inputs now sit (FSQ / LFQ bounds, a tanh)
            evidence |= {"z_jump_factor": factor, "z_jump_step": step, "z_jump_quantizer": q.name,
                         "explains": ["scale-mismatch", "no-encoder-gradient"]}
            parts.append(f"the input norm of {q.name or 'the quantizer'} jumped {factor:.3g}x between "
                         f"two recorded steps (at step {step:,})")
            first = step if first is None or (step is not None and step < first) else first
            break
    return first, evidence, parts


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one run-wide finding when the loss diverges or gradient norms spike."""
    if ev.source_kind == "checkpoint":
        yield from _weight_growth(ev, p)
        return
    if ev.run_series is None:
        return
    loss = _loss(ev, p)
    n_spikes, spike_step, evidence = _spikes(ev, p)
    jump_step, jump_evidence, jump_parts = _jumps(ev, p) if loss is None else (None, {}, [])
    if loss is None and n_spikes == 0 and not jump_parts:
        return
    parts, severity, confidence, steps = [], Severity.WARNING, 0.5, []
    if jump_parts:
        parts, confidence, steps = list(jump_parts), 0.6, [jump_step]
        evidence |= jump_evidence
    if loss is not None:
        sev, confidence, start, ev_loss = loss
        severity, steps = sev, [start]
        evidence |= ev_loss
        parts.append(f"loss rose to {ev_loss['loss_ratio_max']:.3g}x its minimum "
                     f"{ev_loss['loss_min']:.3g} (max {ev_loss['loss_max_finite']:.3g}) "
                     f"from step {start:,}")
        if "loss_nonfinite_step" in ev_loss:
            parts.append(f"non-finite from step {ev_loss['loss_nonfinite_step']:,}")
    if n_spikes:
        if n_spikes >= p.grad_spike_error_count:
            severity = Severity.ERROR
        steps.append(spike_step)
        parts.append(f"{n_spikes} gradient-norm spike(s) >= {p.grad_spike_factor:g}x the recent median")
    fix = ("Lower the learning rate (10x) with a warm-up and clip gradients (clip_grad_norm_ 1.0); "
           "if the commitment term grows with ||z||, add LayerNorm after project_in or raise the "
           "commitment weight; keep the quantizer in float32 under AMP.")
    if "loss_nonfinite_step" in evidence:
        fix += " Find the first non-finite op with torch.autograd.set_detect_anomaly(True)."
    known = [s for s in steps if s is not None]
    yield SPEC.finding(severity=severity, confidence=confidence, quantizer=None,
                       step=min(known) if known else None,
                       message="; ".join(parts), evidence=evidence, fix=fix)


def _weight_growth(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Checkpoints: weights whose norm grew `weight_growth_warn` times or more, first to last."""
    growth = {side: g for side in ("encoder", "decoder")
              if (g := ev.run.get(f"{side}_norm_growth")) is not None and g >= p.weight_growth_warn}
    if not growth:
        return
    side, worst = max(growth.items(), key=lambda kv: kv[1])
    yield SPEC.finding(
        severity=Severity.WARNING, confidence=0.6, quantizer=None,
        message=f"the {side}'s weights grew {worst:.3g}x in norm between the checkpoints: "
                "optimizer steps far too large (learning rate, missing clipping)",
        evidence={f"{s}_norm_growth": g for s, g in growth.items()},
        fix="Lower the learning rate (10x) with a warm-up and clip gradients (clip_grad_norm_ 1.0); "
            "check the LR schedule (a gamma meant to shrink it, a step meant per epoch).")
