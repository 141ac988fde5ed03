"""VQ005 dead-codes: many codes never or rarely selected.

## What it detects
A large fraction of the codebook that the data do not use. From EMA counts (a count below 1% of
the expected `n/K`), from a probe with enough vectors, from optimizer state (rows whose Adam
second moment is exactly 0 never received a gradient), from FSQ level use and LFQ bit balance,
and in a run from the EMA counts or the window usage. The mechanism this failure mode names
(docs/contract.md#failure-modes) is dead codes *while the scales match*; when another mechanism
(scale mismatch, EMA blow-ups, churn) is found, ranking names it in `caused_by`.

## Why it matters
A dead code costs capacity and never recovers by itself: the straight-through estimator gives
gradient only to selected codes, and an unused EMA code decays towards 0 (or blows up with
zero-initialised counts). Usage falls with code dimension and codebook size (CelebA K=512:
100% at dim 4-8, 56% at dim 64; 16% at K=2048). LaBraM #37 logged "Unused code in codebook: 8191".

## Signals and thresholds
Fraction of dead codes `d`: `info` from `info_fraction` (0.25: partial usage, with the
utilisation published models of this kind and size report, `results.reference`), `warning` from
`warn_fraction` (0.8: most of the codebook wasted; converged models commonly leave 30-60%
unused, and the generated zoo's healthy-but-imperfect runs, labelled healthy up to 75% unused,
read up to 0.73 on its tuning split, its dead-code faults 0.85-0.99). Never `error` on its own:
a collapse to a handful of codes is index-collapse's (VQ006) error (ranking raises a cause to
the severity of what it explains), and converged models run at partial usage (VQGAN at
K = 65,536 uses 1.4-4.5% of its codes, SimVQ Table 1). From the first signal available:
- Run: `dead_fraction` series (EMA counts), else `1 - usage_window`; rows where `window_tokens`
  < `min_tokens_per_code` (4) x K are skipped (too few vectors to hit every code).
- Checkpoint: the largest of `dead_fraction` (EMA counts below 0.01 x `count_expected`: the
  history), the probe's dead share (the current codebook on real inputs, used when
  `probe_tokens` >= `min_tokens_per_code` x K) counted against what a probe of n vectors can
  reach, `1 - probe_usage_fraction / probe_usage_expected` (expected = 1 - (1 - 1/K)^n, 0.982
  at n = 4K), and, for gradient-trained codebooks (`vq`, `gumbel`) read from two checkpoints,
  `rows_unchanged_fraction` below 1 (rows with identical bits received no gradient in between,
  so were never selected; 1 is a frozen codebook, VQ008; EMA rows move without being selected,
  so EMA codebooks are judged by their counts). It counts codes unused over the interval:
  checkpoints fewer than ~4K / n steps apart (n tokens per step) leave live codes untouched by
  chance and overstate it.
- Otherwise `optim_rows_no_grad_fraction` below 1 (gradient codebooks; 1 is a frozen codebook,
  VQ008).
- FSQ: `1 - fsq_level_usage_min` (a dimension using u of its levels leaves at most u of the
  grid reachable). LFQ: a bit with `lfq_bit_balance_min` <= `stuck_bit_balance` (0.01) leaves
  half of the codes unused, so `d` = 0.5.
With several checkpoints of one run, `dead_fraction_first` and `dead_fraction_delta` (the
growth from the first checkpoint) go into the evidence and the message.
Run mode: sustained `sustain_steps` (3) rows and still true at the end. Thresholds are
fractions of K, and the count cut-off is relative to n/K, so they hold for any K and batch size.
Confidence 0.9 counts/run, 0.75 probe, 0.7 unchanged rows, 0.6 optimizer state, FSQ and LFQ.

No evidence is not health: a checkpoint whose quantizer stores no usage (a gradient-trained
codebook without counts or optimizer state, FSQ, LFQ), read alone and without a probe of
`min_tokens_per_code` x K vectors, gets an `info` finding "code usage not measured" that says
what would measure it (a probe, an earlier checkpoint). Info findings do not change the verdict,
which covers what was measured; the note keeps "healthy" from being read as "dead codes ruled
out".

## Fix
1. Data-dependent init: k-means on encoder outputs (`kmeans_init=True`; encodec uses 50 iterations).
2. Dead-code replacement with a threshold relative to n/K (e.g. 0.1-0.5 x `count_expected`;
   SoundStream: EMA count < 2 at decay 0.99; Jukebox restarts), resetting the EMA statistics too.
3. Lower the lookup dimension (factorized codes, 8-32-d) or l2-normalise codes and inputs
   (ViT-VQGAN; CelebA dim 64: 56% -> 98%).
4. Rotation trick or affine reparameterisation (Fifty et al. 2024; Huh et al. 2023); smaller K; FSQ.

## References
- Huh et al. 2023 (arXiv 2305.08842): index collapse, affine reparameterisation
- Yu et al. 2021, ViT-VQGAN (arXiv 2110.04627); Dhariwal et al. 2020, Jukebox (random restarts)
- Lancucki et al. 2020 (arXiv 2005.08520): data-dependent re-initialisation
- Fifty et al. 2024 (arXiv 2410.06424): rotation trick; lucidrains/vector-quantize-pytorch #205, PR #164
- lucidrains/vector-quantize-pytorch PR #4 (SoundStream threshold), 935963004/LaBraM #37
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vqdoctor.rules import _series as S
from vqdoctor.rules.base import Evidence, Finding, QuantizerEvidence, RuleSpec, Severity, rule

SPEC = RuleSpec(code="VQ005", id="dead-codes", title="Many codes never or rarely selected",
                explains=("index-collapse",), doc=__doc__)

# Codebooks moved by gradient steps (not EMA): a row no gradient reached keeps its exact bits.
GRADIENT_KINDS = ("vq", "gumbel")


@dataclass(frozen=True)
class Params:
    """Thresholds of VQ005."""

    info_fraction: float = 0.25
    warn_fraction: float = 0.8
    min_tokens_per_code: float = 4.0
    stuck_bit_balance: float = 0.01
    sustain_steps: int = 3


def _run_dead(q: QuantizerEvidence, p: Params) -> tuple[str, Any] | None:
    """(source, per-step dead fraction) from the run series, None when not recorded."""
    if (d := S.qcol(q, "dead_fraction")) is not None:
        return "dead_fraction", d
    if (u := S.qcol(q, "usage_window")) is None:
        return None
    if (wt := S.qcol(q, "window_tokens")) is not None:  # skip windows too short to hit every code
        u = u[(wt.reindex(u.index).ffill() >= p.min_tokens_per_code * q.codebook_size).to_numpy()]
    return "usage_window", 1 - u


def _probe_dead(q: QuantizerEvidence, p: Params) -> float | None:
    """Dead share by the probe, relative to what a probe of its size can reach; None when too small.

    A probe of n vectors hits on average only `probe_usage_expected` = 1 - (1 - 1/K)^n of the
    codes even when every code is equally likely (98.2% at the minimum n = 4K), so the codes the
    probe leaves unused are counted against that reachable share: 1 - usage / expected.
    """
    if q.m("probe_tokens", 0) < p.min_tokens_per_code * q.codebook_size:
        return None
    if (usage := q.m("probe_usage_fraction")) is not None and (reach := q.m("probe_usage_expected")):
        return max(0.0, 1.0 - usage / reach)
    return q.m("probe_dead_fraction")


def _dead(q: QuantizerEvidence, p: Params) -> tuple[str, float, int | None, float] | None:
    """(source, dead fraction, onset step, confidence) from the best available signal."""
    if (run := _run_dead(q, p)) is not None:
        source, s = run
        step = S.onset(s >= p.info_fraction, p.sustain_steps) if len(s) else None
        return None if step is None else (source, float(s.iloc[-1]), step, 0.9)
    # EMA counts (history), a probe (the current codebook on real inputs) and, for a
    # gradient-trained codebook, the rows two checkpoints show untouched can disagree; the worse
    # is reported. Optimizer state, FSQ and LFQ signals are fallbacks.
    unchanged = q.m("rows_unchanged_fraction") if q.kind in GRADIENT_KINDS else None
    primary = [(d, c, src) for src, d, c in (
        ("dead_fraction", q.m("dead_fraction"), 0.9),
        ("probe_dead_fraction", _probe_dead(q, p), 0.75),
        # 1 is a codebook that never moved at all: frozen-codebook's, not dead codes.
        ("rows_unchanged_fraction", unchanged if unchanged is not None and unchanged < 1 else None, 0.7),
    ) if d is not None]
    fallback = [("optim_rows_no_grad_fraction", q.m("optim_rows_no_grad_fraction")
                 if q.m("optim_rows_no_grad_fraction", 1.0) < 1 else None, 0.6)]
    if q.kind == "fsq" and (u := q.m("fsq_level_usage_min")) is not None:
        fallback.append(("fsq_level_usage_min", 1 - u, 0.6))
    if q.kind == "lfq" and (b := q.m("lfq_bit_balance_min")) is not None:
        fallback.append(("lfq_bit_balance_min", 0.5 if b <= p.stuck_bit_balance else 0.0, 0.6))
    if not primary:
        primary = [(d, c, src) for src, d, c in fallback if d is not None][:1]
    if not primary:
        return None
    d, conf, source = max(primary)
    return (source, d, None, conf) if d >= p.info_fraction else None


def _no_evidence(q: QuantizerEvidence, p: Params) -> Finding | None:
    """An info finding when nothing measured says how many codes are in use (checkpoint mode).

    No counts (gradient-trained codebooks, FSQ, LFQ store none), no probe large enough, no
    optimizer moments, no second checkpoint: the report would otherwise read as healthy for want
    of evidence. It stays an info finding (the verdict is about what was measured), and says what
    would measure usage.
    """
    # `codebook_size` is measured for every quantizer the metrics saw: without it nothing was
    # measured at all, and a rule stays silent on missing metrics.
    if q.series is not None or q.m("codebook_size") is None:
        return None
    if q.m("dead_fraction") is not None or _probe_dead(q, p) is not None:
        return None
    if (q.kind in GRADIENT_KINDS and q.m("rows_unchanged_fraction") is not None) \
            or q.m("optim_rows_no_grad_fraction") is not None:
        return None
    need = round(p.min_tokens_per_code * q.codebook_size)
    n = q.m("probe_tokens")
    what = {"fsq": "an FSQ quantizer stores no usage statistics",
            "lfq": "an LFQ quantizer stores no usage statistics"}.get(
        q.kind, "the codebook has no EMA counts (gradient-trained) and no optimizer state was found")
    probe = (f"the probe's {n:,.0f} vectors are fewer than {p.min_tokens_per_code:g} x K = {need:,}"
             if n is not None else "no probe was given")
    return SPEC.finding(
        severity=Severity.INFO, confidence=1.0, quantizer=q.name,
        message=f"code usage not measured: {what}, and {probe}",
        evidence={k: v for k, v in (("codebook_size", q.codebook_size), ("probe_tokens", n),
                                    ("tokens_needed", need)) if v is not None},
        fix=f"Pass encoder outputs (the quantizer's input, >= {need:,} vectors) with --probe, or an "
            "earlier checkpoint of the same run before this one (rows a gradient-trained codebook "
            "never moved were never selected).")


def _fix(q: QuantizerEvidence) -> str:
    exp = S.latest(q, "count_expected")
    steps = []
    if q.m("initted") == 0:
        steps.append("k-means init has not run (initted is False): run a training forward first or "
                     "enable kmeans_init=True")
    else:
        steps.append("initialise the codebook from data (k-means on encoder outputs, kmeans_init=True)")
    thr = f" (e.g. {0.25 * exp:.3g} = 0.25 x the expected {exp:.3g} per code)" if exp else ""
    steps.append("replace dead codes with recent encoder outputs, threshold relative to n/K" + thr
                 + ", resetting their EMA statistics")
    if q.dim >= 16:
        steps.append(f"lower the lookup dimension from {q.dim} to 8-32 (factorized codes) or "
                     "l2-normalise codes and inputs")
    if q.kind == "fsq":
        steps = ["use more evenly spread FSQ levels or a bound that does not saturate (iFSQ)"]
    elif q.kind == "lfq":
        steps = ["a bit is stuck: put a normalisation (GroupNorm, affine=False) before LFQ (lucidrains "
                 "PR #89) and check the entropy-loss weight and sign"]
    text = "; ".join(steps) + "."
    return text[0].upper() + text[1:]


@rule(SPEC, Params)
def check(ev: Evidence, p: Params) -> Iterator[Finding]:
    """Yield one finding per quantizer with a dead fraction at or above `warn_fraction` (info
    when nothing measured usage)."""
    for q in ev.quantizers:
        found = _dead(q, p)
        if found is None:
            if ev.source_kind == "checkpoint" and (note := _no_evidence(q, p)) is not None:
                yield note
            continue
        source, d, step, conf = found
        K, exp = q.codebook_size, S.latest(q, "count_expected")
        evidence: dict[str, Any] = {"dead_fraction": d, "dead_codes": round(d * K),
                                    "codebook_size": K, "source": source}
        for k in ("count_expected", "dead_fraction_abs", "zero_row_fraction", "usage_window",
                  "probe_tokens", "probe_usage_fraction", "probe_usage_expected", "rows_unchanged_fraction",
                  "scale_ratio", "dead_fraction_first", "dead_fraction_delta"):
            if (v := S.latest(q, k)) is not None:
                evidence[k] = v
        why = {"dead_fraction": f"; EMA counts below 1% of the expected {exp:.3g} per code"
               if exp else "", "usage_window": " over the usage window",
               "probe_dead_fraction": " by the probe", "rows_unchanged_fraction":
               " (rows unchanged since the first checkpoint: never selected in between)",
               "optim_rows_no_grad_fraction":
               " (rows that never received a gradient)", "fsq_level_usage_min":
               " (FSQ levels unused)", "lfq_bit_balance_min": " (an LFQ bit is stuck)"}[source]
        first = q.m("dead_fraction_first")
        growth = (f", up from {first:.1%} in the first checkpoint"
                  if first is not None and source == "dead_fraction" and d > first else "")
        ref = _published(q)
        if ref:
            evidence["published_utilization"] = ref
        normal = (f"; published models of this kind and size use {_ref_text(ref)}" if ref else "")
        if d < p.warn_fraction:  # partial usage: worth knowing, not a defect by itself
            yield SPEC.finding(
                severity=Severity.INFO, confidence=conf, quantizer=q.name, step=step,
                message=f"{round(d * K):,}/{K:,} codes unused ({d:.1%}){why}{normal}",
                evidence=evidence, fix=_fix(q))
            continue
        # dead codes waste capacity: a warning; a collapse to a handful of codes is index-collapse's error
        yield SPEC.finding(
            severity=Severity.WARNING, confidence=conf, quantizer=q.name, step=step,
            message=f"{round(d * K):,}/{K:,} codes dead ({d:.1%}{growth}){why}{normal}",
            evidence=evidence, fix=_fix(q))


def _published(q: QuantizerEvidence) -> list[dict[str, Any]]:
    """Published utilisation figures for this quantizer's kind and K (`results.reference`)."""
    from vqdoctor.results.reference import reference_for

    return [r for r in reference_for({"kind": q.kind, "codebook_size": q.codebook_size})
            if r.get("codebook_size")]


def _ref_text(refs: list[dict[str, Any]]) -> str:
    """`"1.4% (VQGAN, K=65,536; SimVQ Table 1), ..."`: what the published models use."""
    parts = []
    for r in refs[:3]:
        u = f"{r.get('qualifier', '')}{100 * r['utilization']:.3g}%"
        parts.append(f"{u} ({r['model']}, K={r['codebook_size']:,}; {r['source'].split(',')[0]})")
    return ", ".join(parts)
