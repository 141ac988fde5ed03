"""VQ010 replacement-churn: dead-code replacement thrashing, or having no effect.

## What it detects
1. **Churn**: a large share of the codebook reset every step. It happens when the replacement
   threshold is close to or above the expected count per code n/K: codes that are merely unlucky
   in one batch get reset, and fresh vectors lose to trained centroids and are reset again.
2. **Ineffective replacement**: codes are replaced step after step, yet the dead fraction does
   not fall, as when the replaced row is overwritten in the same forward because the EMA
   statistics were not reset (encodec / audiocraft `core_vq`, encodec #61, WavTokenizer #89).

## Why it matters
Churn keeps the codebook from settling (in a 64-d toy at n/K = 4, threshold 2 *lowered* usage,
148 vs 478 codes); an ineffective replacement leaves the user believing dead codes are handled
while they are not ("Codebook expiration does not take effect at all").

## Signals and thresholds
- Checkpoint: `replaced_fraction` (counts equal to the reset value, i.e. reset at the last step):
  `warning` from `churn_warn` (0.05 of K per step), `error` from `churn_error` (0.25).
  `replace_threshold_to_expected` (threshold / (n/K)) >= `threshold_rel_warn` (1.0) alone is a
  `warning`: at uniform usage half of the codes fall under it every step.
- Run: `codes_replaced` / K averaged over `window` (20) rows against the same churn levels.
  The recorder counts the rows replaced within one training forward of each cadence step (a
  row that jumped, a row no input chose that moved, or a count reset upward, which an EMA update
  cannot do), not rows that differ between cadence snapshots: a code reset every step is
  counted once per step (512 of 512 in the zoo's churn scenario, where snapshots saw ~300).
  The excess EMA count mass such resets inject is not also reported as ema-divergence.
- Run, ineffective: codes replaced in the window (`codes_replaced` > 0), while the dead fraction
  (`dead_fraction`, else 1 - `usage_window`) stays >= `dead_info` (0.25) and has not fallen by
  `min_dead_drop` (10%, relative) over the `window`: an `info` note, a `warning` from `dead_warn`
  (0.8), the levels of dead-codes (VQ005) whose damage it fails to repair (encodec's expiry,
  overwritten by the next EMA update, encodec #61, reads like this on a healthy run).
Run conditions hold `sustain_steps` (3) rows and at the end. Confidence 0.8 churn, 0.7
ineffective, 0.5 threshold alone.

## Fix
1. Threshold relative to n/K: replace codes whose EMA count is below ~0.1-0.5 x n/K (4M / ViT-VQGAN
   rule `c * B * N_tokens / K`), or fewer codes / more tokens per step.
2. Reset `embed_avg` and `cluster_size` with the row (lucidrains; espnet PR #6284), and expire
   codes after the EMA update (encodec #33).
3. Seed replacements from a buffer of recent encoder outputs, not one batch.

## References
- facebookresearch/encodec #61, #33; jishengpeng/WavTokenizer #89; espnet/espnet PR #6284
- lucidrains/vector-quantize-pytorch #13, #205, PR #4 (SoundStream: EMA count < 2 at decay 0.99)
- Dhariwal et al. 2020, Jukebox (random restarts, threshold 1.0)
- 4M tokenizer notes on ViT-VQGAN guidelines (threshold `c * B * N_tokens / K`, relative to n/K)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ010", id="replacement-churn",
                title="Dead-code replacement thrashing or ineffective",
                explains=("dead-codes", "index-collapse", "codebook-redundancy"), doc=__doc__)

_CHURN_FIX = ("Lower the replacement threshold to ~0.1-0.5 x n/K (expected {exp} per code), or use "
              "fewer codes / more tokens per step; seed replacements from a buffer of recent inputs.")
_NOOP_FIX = ("Replaced rows are undone: reset embed_avg and cluster_size together with the row "
             "(espnet PR #6284, as lucidrains does) and expire codes after the EMA update "
             "(encodec #61, #33).")


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ010."""

    churn_warn: float = 0.05
    churn_error: float = 0.25
    threshold_rel_warn: float = 1.0
    window: int = 20
    dead_info: float = 0.25
    dead_warn: float = 0.8
    min_dead_drop: float = 0.1
    sustain_steps: int = 3


def _run(q: QuantizerEvidence, p: Params) -> tuple[Severity, float, int, str, dict[str, Any]] | None:
    rep = S.qcol(q, "codes_replaced")
    if rep is None:
        return None
    K, k = q.codebook_size, p.sustain_steps
    rate = (rep / K).rolling(p.window, min_periods=1).mean()
    if (step := S.onset(rate >= p.churn_warn, k)) is not None:
        r = float(rate.iloc[-1])
        return (Severity.ERROR if r >= p.churn_error else Severity.WARNING, 0.8, step,
                f"{r:.1%} of the codebook replaced per step (mean over {p.window} rows)",
                {"replaced_per_step_fraction": r, "codes_replaced_last": float(rep.iloc[-1])})
    dead = S.qcol(q, "dead_fraction")
    if dead is None and (u := S.qcol(q, "usage_window")) is not None:
        dead = 1 - u
    if dead is None:
        return None
    active = rep.rolling(p.window, min_periods=1).sum().reindex(dead.index).ffill() > 0
    before = dead.shift(p.window)
    stuck = active & (dead >= p.dead_info) & (before.notna()) & (dead > before * (1 - p.min_dead_drop))
    if (step := S.onset(stuck, k)) is None:
        return None
    d = float(dead.iloc[-1])
    return (Severity.WARNING if d >= p.dead_warn else Severity.INFO, 0.7, step,
            f"codes are replaced ({int(rep.sum()):,} in all) but {d:.1%} stay dead: replacement has no effect",
            {"dead_fraction": d, "codes_replaced_total": float(rep.sum())})


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer whose dead-code replacement churns or does nothing."""
    for q in ev.quantizers:
        exp = S.latest(q, "count_expected")
        thr = S.latest(q, "replace_threshold_to_expected")
        churn_fix = _CHURN_FIX.format(exp=f"{exp:.3g}" if exp else "n/K")
        if S.qcol(q, "codes_replaced") is not None:  # a run: judge on the per-step record only
            if (run := _run(q, p)) is None:
                continue
            sev, conf, step, msg, evidence = run
            fix = churn_fix if "replaced_per_step_fraction" in evidence else _NOOP_FIX
        elif (r := q.m("replaced_fraction")) is not None and r >= p.churn_warn:
            sev = Severity.ERROR if r >= p.churn_error else Severity.WARNING
            conf, step, fix = 0.8, None, churn_fix
            msg = (f"{round(r * q.codebook_size):,}/{q.codebook_size:,} codes hold the reset count "
                   f"({r:.1%}): reset at the last step")
            evidence = {"replaced_fraction": r}
        elif thr is not None and thr >= p.threshold_rel_warn:
            sev, conf, step, fix = Severity.WARNING, 0.5, None, churn_fix
            msg = f"replacement threshold is {thr:.3g}x the expected count per code"
            evidence = {}
        else:
            continue
        evidence |= {k: v for k, v in (("count_expected", exp),
                                       ("replace_threshold_to_expected", thr)) if v is not None}
        yield SPEC.finding(severity=sev, confidence=conf, quantizer=q.name, step=step,
                           message=msg, evidence=evidence, fix=fix)
