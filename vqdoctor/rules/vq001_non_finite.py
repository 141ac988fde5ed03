"""VQ001 non-finite: NaN or Inf in the loss, the quantizer's inputs, outputs, gradients, codebook or EMA buffers.

## What it detects
Any non-finite element in a quantizer tensor (codebook, EMA counts and sums, inputs, outputs,
gradients, the probe given to `inspect`), or a training loss that turned NaN/Inf. In a run it
reports the step where the first tensor went non-finite, and *which* tensor was first: that is
where the fix goes.

## Why it matters
One NaN code row is never selected again, or it is selected and poisons the loss; NaN loss
often coincides with collapse to a single code (v-iashin/SpecVQGAN #20). In EMA quantizers the
usual origin is a division by zero: an unused code's count is 0 and Laplace smoothing is
missing, or underflows in float16 (`(0 + 1e-5)/(n + K*1e-5)*n` is exactly 0.0 in fp16).

## Signals and thresholds
- `nonfinite_codebook`, `nonfinite_rows`, `nonfinite_cluster_size`, `nonfinite_embed_avg`
  (checkpoint and run), `probe_nonfinite` (probe), `nonfinite_input`, `nonfinite_output`,
  `nonfinite_grad`, `nonfinite_buffers` (run); `nonfinite_total` when no per-tensor count
  was measured: any count > 0 fires. No threshold: a single
  NaN is a finding. Onset = first recorded step with a count > 0.
- Training `loss` (run-wide): +-Inf on any row, or NaN on the last `nan_tail_rows` (3) or more
  rows after it had been finite (a NaN that never recovers; isolated NaN rows are treated as
  gaps in recording).
- Where it started, in forward order: input -> EMA buffers -> codebook -> output -> gradient.
  The onset is the first step with a count > 0, or the loss's first non-finite step when that
  came earlier (tensors are scanned every `stats_every` steps, the loss every step).
- `ema_lowp` names float16/bfloat16 EMA buffers in the fix.
Severity: always `error`. Confidence 0.95 for counted tensors, 0.8 for the loss alone.

## Fix
1. Inputs first: the encoder or the data produce NaN/Inf; check the data pipeline, lower the
   learning rate, clip gradients; under AMP keep the last encoder layer and the quantizer in float32.
2. EMA buffers or EMA codebook: keep `cluster_size`/`embed_avg` in float32, keep Laplace
   smoothing with eps >= 1e-5 (1e-3 under AMP, ZhikangNiu/encodec-pytorch #8), initialise
   counts to ones or debias the EMA (Sonnet).
3. Gradient-trained codebook: the optimizer step blew it up; lower the learning rate, clip, use
   GradScaler or bf16.
4. Gradients only: fp16 overflow in backward; use GradScaler (skips such steps) or bf16; for LFQ
   entropy terms use a larger eps (lucidrains/vector-quantize-pytorch PR #85).

## References
- v-iashin/SpecVQGAN #20 (NaN loss with collapse to one code)
- ZhikangNiu/encodec-pytorch #8 (AMP NaN from Laplace smoothing; eps 1e-3)
- lucidrains/vector-quantize-pytorch PR #85, #196 (LFQ fp16 NaN); meshgpt-pytorch #36 (keep VQ in f32)
- rosinality/vq-vae-2-pytorch PR #72 (zero counts "divides by ~0")
- van den Oord et al. 2017 (arXiv 1711.00937) and google-deepmind/sonnet (Laplace smoothing, eps 1e-5)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ001", id="non-finite",
                title="NaN/Inf in loss, activations, gradients, codebook or EMA buffers",
                explains=("dead-codes", "index-collapse"), doc=__doc__)

# metric -> where the values live, in forward order (earliest place first wins a tie)
_WHERE = {"nonfinite_input": "input", "probe_nonfinite": "input",
          "nonfinite_cluster_size": "ema", "nonfinite_embed_avg": "ema", "nonfinite_buffers": "ema",
          "nonfinite_codebook": "codebook", "nonfinite_rows": "codebook",
          "nonfinite_output": "output", "nonfinite_grad": "grad"}
_ORDER = ["input", "ema", "codebook", "output", "grad"]
_PLACE = {"input": "quantizer input", "ema": "EMA buffers", "codebook": "codebook",
          "output": "quantizer output", "grad": "gradients"}
_FIX = {
    "input": "Non-finite values reach the quantizer from the encoder or the data: check the data for "
             "NaN/Inf, lower the learning rate and clip gradients; under AMP keep the last encoder "
             "layer and the quantizer in float32.",
    "ema": "Keep cluster_size/embed_avg in float32 (exclude the quantizer from .half()/autocast), keep "
           "Laplace smoothing with eps >= 1e-5 (1e-3 under AMP), and initialise counts to ones or "
           "debias the EMA (Sonnet).",
    "codebook": "The optimizer step made codebook rows non-finite: lower the learning rate, clip "
                "gradients, use GradScaler or bf16; look for a loss divergence just before.",
    "output": "The lookup returned non-finite vectors from finite inputs: non-finite codebook rows are "
              "being selected; fix the codebook (see EMA/optimizer) and re-seed those rows.",
    "grad": "Gradients overflow in backward: use GradScaler (it skips such steps) or bf16; for LFQ "
            "entropy terms raise eps (lucidrains PR #85).",
}


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ001."""

    nan_tail_rows: int = 3


def _loss_nonfinite_step(ev: Evidence, p: Params) -> int | None:
    loss = S.column(ev.run_series, "loss", finite=False)
    if loss is None:
        return None
    v = loss.to_numpy()
    inf = np.isinf(v)
    finite = np.isfinite(v)
    first_inf = S.step_of(loss.index[int(np.argmax(inf))]) if inf.any() else None
    first_nan = None
    if finite.any():
        last = int(np.nonzero(finite)[0][-1])
        tail = v[last + 1:]
        if len(tail) >= p.nan_tail_rows and np.isnan(tail).all():
            first_nan = S.step_of(loss.index[last + 1])
    steps = [s for s in (first_inf, first_nan) if s is not None]
    return min(steps) if steps else None


def _tensors(q: QuantizerEvidence) -> dict[str, tuple[float, int | None]]:
    """metric -> (max count, first step with a count > 0) for every non-finite metric seen."""
    out: dict[str, tuple[float, int | None]] = {}
    for name in _WHERE:
        s = S.qcol(q, name)
        if s is not None:
            bad = s[s > 0]
            if len(bad):
                out[name] = (float(bad.max()), S.step_of(bad.index[0]))
        elif (v := q.m(name)) is not None and v > 0:
            out[name] = (v, None)
    if not out and (v := q.m("nonfinite_total")) is not None and v > 0:
        out["nonfinite_total"] = (v, None)  # only the total was measured: location unknown
    return out


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer holding non-finite values, or one run-wide for the loss."""
    loss_step = _loss_nonfinite_step(ev, p)
    found = False
    for q in ev.quantizers:
        t = _tensors(q)
        if not t:
            continue
        found = True
        key = min(t, key=lambda n: (float("inf") if t[n][1] is None else t[n][1],
                                    _ORDER.index(_WHERE.get(n, "codebook"))))
        where = _WHERE.get(key, "codebook")
        if where == "codebook" and q.kind == "vq-ema":
            where = "ema"  # an EMA codebook is embed_avg / counts: the division is the origin
        steps = [s for _, s in t.values() if s is not None]
        if steps and loss_step is not None:
            # tensors are scanned at the cadence, the loss every step: the earlier is the onset
            steps.append(loss_step)
        evidence = {n: v for n, (v, _) in t.items()}
        evidence |= {f"{n}_first_step": s for n, (_, s) in t.items() if s is not None}
        evidence["origin"] = where
        if (lowp := S.latest(q, "ema_lowp")) is not None:
            evidence["ema_lowp"] = lowp
        if loss_step is not None:
            evidence["loss_nonfinite_step"] = loss_step
        parts = ", ".join(f"{n.replace('probe_nonfinite', 'probe').removeprefix('nonfinite_')} "
                          f"{int(v):,}" for n, (v, _) in t.items() if n != "nonfinite_rows")
        if "nonfinite_rows" in t:
            parts += f" (in {int(t['nonfinite_rows'][0]):,} codebook rows)"
        fix = _FIX[where]
        if where == "ema" and lowp == 1:
            fix = "EMA buffers are stored in float16/bfloat16: " + fix
        yield SPEC.finding(severity=Severity.ERROR, confidence=0.95, quantizer=q.name,
                           step=min(steps) if steps else None,
                           message=f"non-finite elements, first in the {_PLACE[where]}: {parts}",
                           evidence=evidence, fix=fix)
    if loss_step is not None and not found:
        yield SPEC.finding(
            severity=Severity.ERROR, confidence=0.8, quantizer=None, step=loss_step,
            message=f"training loss became non-finite at step {loss_step:,}",
            evidence={"loss_nonfinite_step": loss_step},
            fix="The quantizer's tensors stayed finite (or were not recorded): run one step with "
                "torch.autograd.set_detect_anomaly(True) to find the op; look for log(0) in entropy "
                "terms and division by a zero norm in l2-normalisation; lower the learning rate.")
