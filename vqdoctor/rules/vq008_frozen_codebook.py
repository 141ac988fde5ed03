"""VQ008 frozen-codebook: the codebook does not move.

## What it detects
A codebook that stays exactly where it started: bit-identical across checkpoints of one run, no
change per step in a run, or (gradient codebooks) an optimizer that never saw a gradient for
any of its rows. Causes: the codebook is left out of the optimizer, `requires_grad=False` with no
EMA update, the codebook loss is missing or detached, EMA decay 1.0, or EMA updates that never
run. Not applied to FSQ/LFQ (no stored codebook) nor to SimVQ (a frozen base codebook is the
design; the learned map moves instead).

## Why it matters
A frozen codebook cannot follow the encoder: as the encoder moves, inputs drift away from the
fixed codes (scale mismatch), fewer codes are nearest to anything, and usage collapses.

## Signals and thresholds
- Checkpoints (two or more of one run): `codebook_frozen` == 1 (bit-identical), or
  `codebook_rel_change` <= `rel_change_zero` (1e-7, float32 resolution); `counts_frozen` tells
  EMA codebooks with frozen statistics (decay 1.0 / no update) apart.
- Checkpoint optimizer state (gradient codebooks): `optim_rows_no_grad_fraction` >=
  `no_grad_rows_frozen` (1.0): every row's Adam second moment is exactly 0.
- Run: `codebook_rms_change` / `code_norm_median` <= `rel_change_zero` on `frozen_window` (20)
  consecutive recorded rows, still true at the end (long enough to ignore gradient
  accumulation); `grad_norm_codebook` tells "no gradient" from "gradient but no update".
Severity `error`. Confidence 0.9 run and bit-identical checkpoints, 0.85 optimizer state, 0.8
relative change below resolution.

## Fix
1. EMA codebooks: a decay below 1 (0.8-0.99) and the quantizer in training mode while training.
2. Gradient codebooks: put the codebook in the optimizer's parameter groups with a non-zero
   learning rate (zalando's `VectorQuantizerEMA` re-creates `nn.Parameter`s every step, leaving
   the optimizer with stale references).
3. Keep the codebook loss `||sg(z) - q||^2` (it is the only gradient path to the codes) and
   `requires_grad=True`, or switch to EMA updates.

## References
- zalandoresearch/pytorch-vq-vae (parameters re-created each step; optimizer holds stale refs)
- van den Oord et al. 2017 (arXiv 1711.00937): codebook loss and EMA alternative
- Dhariwal et al. 2020, Jukebox: `dk`, the RMS codebook change per step, logged as a monitor
- lucidrains/vector-quantize-pytorch #222 (learnable-codebook gradients not synchronised)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ008", id="frozen-codebook", title="The codebook does not move",
                explains=("scale-mismatch", "dead-codes", "index-collapse", "codebook-redundancy"),
                doc=__doc__)

_EMA_FIX = ("EMA updates are not happening: set decay below 1 (0.8-0.99), keep the quantizer in "
            "training mode while training, and check the update is not disabled.")
_NO_GRAD_FIX = ("The codebook receives no gradient: keep the codebook loss ||sg(z) - q||^2 (not "
                "detached), requires_grad=True, or switch to EMA updates.")
_NO_STEP_FIX = ("The codebook has gradient but is never updated: add it to the optimizer's param "
                "groups with a non-zero learning rate (do not re-create the nn.Parameter after "
                "building the optimizer, as zalando's VectorQuantizerEMA does).")


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ008."""

    rel_change_zero: float = 1e-7
    frozen_window: int = 20
    no_grad_rows_frozen: float = 1.0


def _run(q: QuantizerEvidence, p: Params) -> tuple[int, dict[str, Any], str] | None:
    rms = S.qcol(q, "codebook_rms_change")
    if rms is None:
        return None
    norm = S.qcol(q, "code_norm_median")
    rel = rms / norm.reindex(rms.index).ffill() if norm is not None else rms
    step = S.onset(rel.fillna(rms) <= p.rel_change_zero, p.frozen_window)
    if step is None:
        return None
    grad = S.latest(q, "grad_norm_codebook")
    fix = _EMA_FIX if q.kind == "vq-ema" else (
        _NO_GRAD_FIX if grad == 0 else _NO_STEP_FIX if grad is not None else _NO_GRAD_FIX + " "
        + _NO_STEP_FIX)
    return step, {"codebook_rms_change": float(rms.iloc[-1]), "grad_norm_codebook": grad,
                  "frozen_rows": int((rel <= p.rel_change_zero).sum())}, fix


def _checkpoint(q: QuantizerEvidence, p: Params) -> tuple[float, dict[str, Any], str] | None:
    frozen, rel = q.m("codebook_frozen"), q.m("codebook_rel_change")
    if frozen == 1 or (rel is not None and rel <= p.rel_change_zero):
        fix = _EMA_FIX if q.kind == "vq-ema" else _NO_GRAD_FIX + " " + _NO_STEP_FIX
        return (0.9 if frozen == 1 else 0.8), {
            "codebook_frozen": frozen, "codebook_rel_change": rel, "counts_frozen": q.m("counts_frozen"),
            "drift_checkpoints": q.m("drift_checkpoints")}, fix
    nog = q.m("optim_rows_no_grad_fraction")
    if q.kind != "vq-ema" and nog is not None and nog >= p.no_grad_rows_frozen:
        return 0.85, {"optim_rows_no_grad_fraction": nog}, _NO_GRAD_FIX
    return None


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose codebook did not move."""
    for q in ev.quantizers:
        if q.kind in ("fsq", "lfq", "simvq"):
            continue
        if (run := _run(q, p)) is not None:
            step, evidence, fix = run
            conf: float = 0.9
            msg = f"codebook unchanged since step {step:,} (RMS change {evidence['codebook_rms_change']:.2g})"
        elif S.qcol(q, "codebook_rms_change") is None and (ck := _checkpoint(q, p)) is not None:
            conf, evidence, fix = ck
            step = None
            if "optim_rows_no_grad_fraction" in evidence:
                msg = "no codebook row ever received a gradient (Adam second moments all 0)"
            else:
                n = evidence.get("drift_checkpoints")
                msg = (f"codebook identical across {int(n) if n else 'the'} checkpoints"
                       + ("; EMA counts frozen too" if evidence.get("counts_frozen") == 1 else ""))
        else:
            continue
        yield SPEC.finding(severity=Severity.ERROR, confidence=conf, quantizer=q.name, step=step,
                           message=msg, fix=fix,
                           evidence={k: v for k, v in evidence.items() if v is not None})
