"""VQ004 ema-divergence: EMA codebook statistics inconsistent with the data they track.

## What it detects
For EMA quantizers (`vq-ema`) only, five sub-causes, named in the message and the fix:
1. **blow-up rows**: a few code vectors with norms orders of magnitude above the median. The
   signature of zero-initialised counts without debiasing: an unused code keeps `m = decay*e0`
   but its smoothed count is ~eps, so `||e|| ~ decay/eps * ||e0||` (~1e5 x) after one step.
2. **broken invariant**: `embed != embed_avg / smoothed(cluster_size)` on live rows: the codebook
   is also trained by gradient or edited, eps differs, or rows were overwritten without
   resetting their statistics.
3. **low-precision buffers**: EMA buffers stored in float16/bfloat16.
4. **eval mutation**: buffers changed by forwards in eval mode or under `no_grad`.
5. **count mass**: the sum of EMA counts far from the tokens per step (x world size).

## Why it matters
Blown-up rows are never selected again (dead for good); in our toy
(docs/ema-and-layouts.md#zero-initialised-counts-blow-rows-up) used codes fell from 406 to 6 in one
step and perplexity from 199 to 1.7. The same division inflates the *used* codes by
~decay/((1-decay) x count), so the whole codebook ends up on another scale than its inputs. In bf16
an EMA with decay 0.999 never moves (updates round away); fp16 Laplace smoothing underflows to 0,
giving Inf/NaN rows. Evaluation passes that update the statistics make the codebook track evaluation
data and replace codes from it (the user story, docs/contract.md#the-user-story, kept the VQ in
training mode during evaluation). The arithmetic of each sub-cause:
docs/ema-and-layouts.md#how-codebooks-break-numerically.

## Signals and thresholds
- `blowup_ratio` (max / median code norm) >= `blowup_ratio_warn` (100) with `blowup_rows` > 0;
  `error` from `blowup_ratio_error` (1e3); the zero-init signature is ~decay/eps (1e4-1e5). In a
  run both are recorded at every cadence step (none when the median code norm is ~0, below 1e-6
  of the median row: an encoder output of exactly 0 makes the origin the only live code, and
  every ordinary row would read as blown up 1e10 times). `error` too below 1e3 when the counts
  show the warm-up from zero: `ema_count_sum_to_tokens` <= `warmup_start_max` (0.2) on the first
  recorded row and at least twice that later (sum = n (1 - decay^t): 0.049 -> 0.97 in the user
  story). A blow-up that held `sustain_steps` rows over `transient_steps` (20) steps or more
  and faded while dead codes or a collapse remain is still reported: as the counts fill up the
  blown rows shrink back (decay^t), but the codes they held stay dead.
- `ema_residual_max` (relative, live rows) >= `residual_warn` (0.01); healthy EMA codebooks
  read 0 to ~3e-6. When `ema_residual_median` also >= `residual_warn`, the break is systematic.
- `nonfinite_rows_zero_count` >= `zero_count_rows_min` (0.99): the Inf/NaN codebook rows are
  exactly the codes whose stored count is 0, the fingerprint of `embed_avg / 0` (missing or
  underflowed Laplace smoothing); `error`, confidence 0.85. NaN carried in by the inputs lands
  on codes that were hit (positive counts) and does not match.
- `ema_lowp` == 1: float16/bfloat16 EMA buffers (`error` once the quantizer's tensors hold
  non-finite values: smoothing has underflowed, and the non-finite rows are its consequence).
- `eval_mutation` > 0 on any recorded step (run): an event, no sustain needed. A `warning` when
  the evaluation forwards moved the codebook: `eval_codebook_rms_change` (per changed evaluation
  forward) >= `eval_move_factor` (0.5) x `codebook_forward_rms_change` (per training forward,
  medians), or when either was not measured: the model changes from evaluation data (which then
  leaks into it), whether or not that data is distributed like the training data (then it moves
  the codebook about as far as a training batch: 2.3x on the generated zoo's tuning split, where
  3x had been asked before and missed it). Below that (counters bumped, the table barely moved)
  an `info` note.
- `ema_count_sum_to_tokens` outside [1/`count_sum_tolerance`, `count_sum_tolerance`] (2) x 1,
  and outside the same band around the world size (`world_size` in the run scalars): counts
  all-reduced or not. Replacement adds mass (our toy read 1.36), so the band is wide; excess
  mass while `codes_replaced` averages >= `replaced_rate_mass` (0.01) x K per step over the
  last 20 rows is left to replacement-churn (counts reset to the threshold every step).
Run mode: state conditions must hold `sustain_steps` (3) rows and still hold at the end.
Severity `error` for blow-ups >= `blowup_ratio_error` (or with the zero-init warm-up) of at
least `blowup_rows_share` (5%) of the codes, otherwise `warning`; a blow-up that faded is reported
only when it took that share (a single row blown up once costs one code).
Library arithmetic (`ema_rule`): vector-quantize-pytorch >= 1.34 computes
`(embed_avg + eps * embed) / (cluster_size + eps)` from zero-initialised statistics, where counts
warming up from zero divide nothing by ~0: the zero-init warm-up signature and low count mass are
not faults there, and the invariant is checked in that form. Confidence 0.85 blow-ups, 0.9 eval mutation (0.5 as a note), 0.8 low
precision, 0.6 invariant, 0.5 count mass.

## Fix
1. Zero-init blow-ups: initialise `cluster_size` to ones or debias the EMA (Sonnet), keep
   Laplace smoothing with eps >= 1e-5 in float32; or enable k-means init; re-seed blown-up rows.
2. Eval mutation: put the quantizer in eval mode for evaluation (`model.eval()`), and make sure
   the library skips EMA updates there.
3. Low precision: keep `cluster_size`, `embed_avg` and the codebook in float32.
4. Broken invariant: do not also train an EMA codebook by gradient; reset `embed_avg` and
   `cluster_size` with any row you overwrite (espnet PR #6284).

## References
- rosinality/vq-vae-2-pytorch PR #72 (zero counts "divides by ~0")
- Irie et al. 2023 (zero-init counts hurt; lucidrains switched to ones in v1.15.3, commit 4c514db)
- van den Oord et al. 2017 (arXiv 1711.00937); google-deepmind/sonnet (debiased EMA, eps 1e-5)
- ZhikangNiu/encodec-pytorch #8 (fp16 smoothing NaN); lucidrains/vector-quantize-pytorch PR #144/#145
- facebookresearch/encodec #61, espnet/espnet PR #6284 (replacement without resetting statistics)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import (
    Evidence,
    Finding,
    QuantizerEvidence,
    RuleSpec,
    Severity,
    iter_quantizers,
    rule,
)

SPEC = RuleSpec(code="VQ004", id="ema-divergence",
                title="EMA statistics inconsistent with the data they track",
                explains=("non-finite", "scale-mismatch", "dead-codes", "index-collapse",
                          "loss-divergence", "codebook-redundancy"),
                doc=__doc__)


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ004."""

    blowup_ratio_warn: float = 100.0
    blowup_ratio_error: float = 1e3
    residual_warn: float = 0.01
    count_sum_tolerance: float = 2.0
    zero_count_rows_min: float = 0.99
    sustain_steps: int = 3
    warmup_start_max: float = 0.2
    eval_move_factor: float = 0.5
    replaced_rate_mass: float = 0.01
    transient_steps: int = 20
    blowup_rows_share: float = 0.05


@dataclass(frozen=True)
class _Sub:
    key: str
    severity: Severity
    confidence: float
    step: int | None
    message: str
    evidence: dict[str, Any]
    fix: str


_BLOWUP_FIX = ("Initialise cluster_size to ones or debias the EMA (Sonnet), keep Laplace smoothing "
               "with eps >= 1e-5 in float32, or enable k-means init; re-seed the blown-up rows.")


def _warmup_from_zero(q: QuantizerEvidence, p: Params) -> dict[str, float] | None:
    """EMA counts that started near zero and filled up: sum/tokens <= `warmup_start_max` on the
    first recorded row, then at least twice that (n (1 - decay^t) without debiasing)."""
    s = S.qcol(q, "ema_count_sum_to_tokens")
    if s is None or len(s) < 2 or q.ema_rule == "eps-blend":  # zero-init is safe there: no division by ~0
        return None
    first, peak = float(s.iloc[0]), float(s.iloc[1:].max())
    if first <= p.warmup_start_max and peak >= 2 * first:
        return {"ema_count_sum_to_tokens_first": first, "ema_count_sum_to_tokens_later": peak}
    return None


def _eval_moves(q: QuantizerEvidence) -> float | None:
    """Codebook move per evaluation forward / per training forward (medians); None: not measured."""
    ev, tr = S.qcol(q, "eval_codebook_rms_change"), S.qcol(q, "codebook_forward_rms_change")
    if ev is None or tr is None:
        return None
    base = float(tr.median())
    return float(ev.median()) / base if base > 0 else float("inf")


def _nonfinite_seen(q: QuantizerEvidence) -> bool:
    for name in ("nonfinite_buffers", "nonfinite_codebook", "nonfinite_cluster_size", "nonfinite_embed_avg",
                 "nonfinite_output"):
        s = S.qcol(q, name)
        if (s is not None and bool((s > 0).any())) or (q.m(name) or 0) > 0:
            return True
    return False


def _blowup(q: QuantizerEvidence, p: Params) -> _Sub | None:
    k = p.sustain_steps
    warm = _warmup_from_zero(q, p)
    h = S.judge(q, "blowup_ratio", lambda v: v >= p.blowup_ratio_warn, k)
    ended = None
    if h is None and (s := S.qcol(q, "blowup_ratio")) is not None:
        ep = S.transient(s >= p.blowup_ratio_warn, k, p.transient_steps)
        if ep is not None and S.damage_at_end(q) is not None:
            ended = ep
            h = S.Hit(step=ep.start, last=float(s.iloc[-1]), worst=float(s.loc[ep.start:ep.end].max()))
    if h is None:
        return None
    rows = S.latest(q, "blowup_rows", 0) or 0
    if ended is not None:
        b = S.qcol(q, "blowup_rows")
        rows = float(b.loc[ended.start:ended.end].max()) if b is not None else rows
    if rows <= 0:
        return None
    # a few rows blown up cost a few codes; the run is broken only when a share of K is lost
    many = rows >= p.blowup_rows_share * max(1, q.codebook_size * q.heads)
    if ended is not None and not many:  # faded, and too few rows to explain the damage left
        return None
    worst = max(h.last, h.worst)
    zero_init = worst >= p.blowup_ratio_error or warm is not None
    why = ""
    if warm is not None:
        why = (f" (zero-initialised counts without debiasing: the counts started at "
               f"{warm['ema_count_sum_to_tokens_first']:.2g}x the tokens per step and filled up)")
    elif zero_init:
        why = " (zero-initialised counts without debiasing: ~decay/eps)"
    msg = f"{int(rows):,} code rows blown up to {worst:.3g}x the median norm" + why
    if ended is not None:
        msg += (f", from step {ended.start:,} to {ended.end:,}; the codes they held stay dead")
    evidence: dict[str, Any] = {"blowup_rows": int(rows), "blowup_ratio": worst, **(warm or {})}
    if ended is not None:
        evidence |= {"blowup_last_step": ended.end, "blowup_ratio_now": h.last}
    return _Sub("blowup", Severity.ERROR if zero_init and many else Severity.WARNING, 0.85, h.step,
                msg, evidence, _BLOWUP_FIX)


def _subs(q: QuantizerEvidence, world: float, p: Params) -> Iterator[_Sub]:
    k = p.sustain_steps
    if (b := _blowup(q, p)) is not None:
        yield b
    if h := S.judge(q, "eval_mutation", lambda v: v > 0, 1, at_end=False):
        moves = _eval_moves(q)
        plausible = moves is None or moves >= p.eval_move_factor
        ev_eval: dict[str, Any] = {"eval_mutation_steps": h.rows, "eval_mutation_max": h.worst}
        if moves is not None:
            ev_eval["eval_move_to_train_move"] = moves
        move_txt = ("" if moves is None else
                    f"; an evaluation forward moves the codebook {moves:.3g}x as far as a training forward")
        yield _Sub("eval_mutation", Severity.WARNING if plausible else Severity.INFO, 0.9 if plausible else 0.5,
                   h.step,
                   f"EMA buffers changed by eval/no-grad forwards ({h.rows} step(s), up to {h.worst:g}){move_txt}"
                   + ("" if plausible else ": the table barely moved, so it does not explain the codebook"),
                   ev_eval,
                   "Call model.eval() (or quantizer.eval()) for evaluation passes so they do not update "
                   "the EMA statistics or replace codes from evaluation data.")
    if h := S.judge(q, "nonfinite_rows_zero_count", lambda v: v >= p.zero_count_rows_min, 1):
        nf = S.qcol(q, "nonfinite_codebook")  # a run: dated where the codebook first held Inf/NaN
        since = h.step if h.step is not None or nf is None else S.onset(nf > 0, 1, at_end=False)
        yield _Sub("no_smoothing", Severity.ERROR, 0.85, since,
                   f"the codebook rows that hold Inf/NaN are those whose EMA count is exactly 0 ({h.last:.0%}): "
                   "embed_avg divided by a zero count, without (or with an underflowed) Laplace smoothing",
                   {"nonfinite_rows_zero_count": h.last},
                   "Laplace-smooth the counts before dividing ((N + eps) / (n + K eps) * n, eps 1e-5, in "
                   "float32), start them at ones or debias; re-seed the non-finite rows with their statistics.")
    if h := S.judge(q, "ema_lowp", lambda v: v >= 1, 1):
        broken = _nonfinite_seen(q)  # the underflow has already happened: the mechanism is shown
        # a run records the dtype once: it held from the first recorded step on
        since = h.step if h.step is not None or q.series is None or q.series.empty else S.step_of(q.series.index[0])
        yield _Sub("lowp", Severity.ERROR if broken else Severity.WARNING, 0.9 if broken else 0.8, since,
                   "EMA buffers stored in float16/bfloat16 (updates round away, smoothing underflows)"
                   + ("; they already hold non-finite values" if broken else ""),
                   {"ema_lowp": 1}, "Keep cluster_size, embed_avg and the codebook in float32 "
                   "(exclude the quantizer from .half() and autocast).")
    if h := S.judge(q, "ema_residual_max", lambda v: v >= p.residual_warn, k):
        med = S.latest(q, "ema_residual_median")
        systematic = med is not None and med >= p.residual_warn
        yield _Sub("invariant", Severity.WARNING, 0.6, h.step,
                   f"codebook != embed_avg / smoothed counts by up to {h.last:.3g} (relative)"
                   + (f", median {med:.3g}: systematic" if systematic else " on some rows"),
                   {"ema_residual_max": h.last, "ema_residual_median": med},
                   "Most rows disagree with their statistics: do not also train an EMA codebook by "
                   "gradient (learnable codebook, optimizer), and check that eps matches the library."
                   if systematic else
                   "Reset embed_avg and cluster_size together with any row you overwrite "
                   "(espnet PR #6284); otherwise the next EMA step undoes it.")
    tol = math.log(p.count_sum_tolerance)

    def off(v: Any) -> Any:
        return (abs(_log(v)) >= tol) & (abs(_log(v / world)) >= tol)

    if h := S.judge(q, "ema_count_sum_to_tokens", off, k):
        low = h.last < 1
        if low and q.ema_rule == "eps-blend":
            # (embed_avg + eps e) / (counts + eps): counts warming up from zero divide nothing by ~0
            return
        rep = S.qcol(q, "codes_replaced")
        churn = (rep is not None and q.codebook_size > 0
                 and float(rep.iloc[-20:].mean()) / q.codebook_size >= p.replaced_rate_mass)
        if low or not churn:  # excess mass from codes reset every step is replacement-churn's signature
            yield _Sub("count_mass", Severity.WARNING, 0.5, h.step,
                       f"EMA counts hold {h.last:.3g}x the tokens per step (world size {world:g})",
                       {"ema_count_sum_to_tokens": h.last, "world_size": world},
                       "Counts still warming up from zero without debiasing (sum = n(1-decay^t)): "
                       "initialise them to ones or debias." if low else
                       "Extra mass enters the counts: replacement resetting counts to a threshold, or "
                       "evaluation forwards updating them; reset counts to a value below n/K.")


def _log(v: Any) -> Any:
    return np.log(np.maximum(v, 1e-300))


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per EMA quantizer, naming every sub-cause seen (worst first)."""
    world = float(ev.run.get("world_size", 1) or 1)
    for q in iter_quantizers(ev, kinds=("vq-ema",)):
        subs = sorted(_subs(q, world, p), key=lambda s: (s.severity.rank, -s.confidence))
        if not subs:
            continue
        top = subs[0]
        steps = [s.step for s in subs if s.step is not None]
        evidence: dict[str, Any] = {"sub_causes": [s.key for s in subs]}
        for s in subs:
            evidence |= {k: v for k, v in s.evidence.items() if v is not None}
        also = "; also: " + "; ".join(s.message for s in subs[1:]) if len(subs) > 1 else ""
        yield SPEC.finding(severity=top.severity, confidence=top.confidence, quantizer=q.name,
                           step=min(steps) if steps else None, message=top.message + also,
                           evidence=evidence, fix=" ".join(dict.fromkeys(s.fix for s in subs)))
