"""Code usage from counts: the one definition of every usage metric.

Counts are `[..., H, K]`: H separate codebooks (heads) of K codes each, hard counts of code
indices (a step, a window of steps, a probe) or EMA counts (`cluster_size` of a checkpoint).
Everything is float64 numpy, exact, and pure. Per-head values are averaged over the heads that
saw any count; non-finite and negative counts count as 0.

Two layers, as in torchmetrics: pure functions (`usage_metrics`, `dead_fraction`,
`usage_histogram`, `fsq_level_usage`, `lfq_bit_balance`, `reachable_codes`) and a stateful,
sum-mergeable `UsageWindow` (`update` / `merge` / `compute`) that the watch's flush, the run
report and the gate all use for windowed usage, so the same counts give the same numbers
whichever path they take (checkpoint, recorded run, gate window).

Metric names (vocabulary: `metrics.names`): `usage_metrics` gives tokens, perplexity,
perplexity_fraction, entropy_norm, top1_share, dead_fraction, usage_fraction (= 1 - dead
fraction: codes at or above DEAD_REL of the uniform share); `UsageWindow.compute` gives the
windowed names usage_window, usage_fraction, dead_fraction, entropy_norm_window,
perplexity_window, window_tokens, window_steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vqdoctor.metrics.constants import DEAD_REL, MIN_HITS_PER_CODE

# Bounds of the automatic usage window (steps): at least ~MIN_HITS_PER_CODE expected hits per
# code under uniform usage, never shorter than MIN (recent enough to be stable), never longer than MAX.
WINDOW_MIN = 100
WINDOW_MAX = 5000
# Groups of codes in a usage histogram (most used first).
HIST_BUCKETS = 16
# FSQ / LFQ per-dimension usage is computed up to this many codes (a bincount per dimension).
IMPLICIT_MAX_CODES = 1 << 22


def clean(counts: np.ndarray | list[float]) -> np.ndarray:
    """Counts as float64 with non-finite and negative entries set to 0."""
    c = np.asarray(counts, dtype=np.float64)
    return np.clip(np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)


def _head_mean(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Mean over the head axis (last) of `x`, counting only heads with n > 0; NaN when none."""
    used = n > 0
    k = used.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, np.where(used, x, 0.0).sum(-1) / np.maximum(k, 1), np.nan)


def head_usage(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-head usage of `[..., H, K]` counts.

    With n = sum_i c_i and p_i = c_i / n: entropy H = -sum p log p (nats), perplexity exp H,
    entropy_norm H / log K (1 when K = 1), top1_share max p, dead_fraction the share of codes with
    c_i < DEAD_REL * n / K. Heads with n = 0 give NaN (nothing is known of them).

    Returns:
        name -> `[..., H]` arrays, plus "tokens" (n).
    """
    c = clean(counts)
    K = c.shape[-1]
    n = c.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = c / np.where(n > 0, n, 1.0)[..., None]
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
        dead = (c < DEAD_REL * (n / max(K, 1))[..., None]).mean(-1)
        top = c.max(-1, initial=0.0) / np.where(n > 0, n, 1.0)
    known = n > 0
    nan = np.full_like(h, np.nan)
    return {
        "tokens": n,
        "entropy": np.where(known, h, nan),
        "perplexity": np.where(known, np.exp(h), nan),
        "entropy_norm": np.where(known, h / math.log(K) if K > 1 else np.ones_like(h), nan),
        "top1_share": np.where(known, top, nan),
        "dead_fraction": np.where(known, dead, nan),
    }


def usage_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Usage metrics of `[..., H, K]` counts, heads averaged (heads that saw no count left out).

    Returns:
        name -> `[...]` arrays: tokens (counts per head, mean over all heads), perplexity,
        perplexity_fraction (perplexity / K), entropy_norm, top1_share, dead_fraction,
        usage_fraction (1 - dead_fraction). NaN where no head saw a count.
    """
    c = clean(counts)
    if c.ndim == 1:
        c = c[None]
    K = c.shape[-1]
    per = head_usage(c)
    n = per["tokens"]
    out = {"tokens": n.mean(-1)}
    for k in ("perplexity", "entropy_norm", "top1_share", "dead_fraction"):
        out[k] = _head_mean(np.nan_to_num(per[k]), n)
    out["perplexity_fraction"] = out["perplexity"] / max(K, 1)
    out["usage_fraction"] = 1.0 - out["dead_fraction"]
    return out


def dead_fraction(counts: np.ndarray) -> float:
    """Share of the K codes of one `[K]` count vector below DEAD_REL x the uniform share n/K.

    NaN when every count is 0 (no usage is known, so no code is known to be dead).
    """
    return float(head_usage(np.asarray(counts)[None])["dead_fraction"][0])


def usage_histogram(counts: np.ndarray, buckets: int = HIST_BUCKETS) -> list[float]:
    """Share of all counts held by each 1/buckets of the codes, most used first.

    Codes of each head are sorted by count and split into min(buckets, K) near-equal groups; the
    shares are averaged over the heads that saw any count. A collapsed codebook reads
    [0.99, 0.01, 0, ...], a uniform one is flat at 1/buckets.

    Args:
        counts: `[H, K]` (or `[K]`) counts.
        buckets: number of groups.

    Returns:
        the shares (summing to 1); [] without counts.
    """
    c = clean(counts)
    c = c.reshape(-1, c.shape[-1]) if c.ndim else c.reshape(1, 1)
    groups = min(buckets, c.shape[-1])
    hists = []
    for row in c:
        total = row.sum()
        if total <= 0 or groups < 1:
            continue
        ordered = np.sort(row)[::-1]
        hists.append([float(g.sum() / total) for g in np.array_split(ordered, groups)])
    if not hists:
        return []
    return [float(x) for x in np.mean(np.asarray(hists), axis=0)]


def fsq_level_usage(counts: np.ndarray, levels: tuple[int, ...]) -> dict[str, float]:
    """FSQ per-dimension level usage and saturation from code counts.

    A code index is the mixed-radix number of its per-dimension levels (basis = cumulative
    product of levels, lowest dimension first, as vector-quantize-pytorch and the FSQ paper do),
    so the counts of the K codes give the usage of every level of every dimension exactly.

    Args:
        counts: `[H, K]` counts, K = prod(levels).
        levels: levels per dimension.

    Returns:
        fsq_level_usage_min (smallest share of levels used in one dimension) and fsq_saturation
        (share of values on the outermost two levels, over all dimensions); {} when K does not match.
    """
    K = int(np.prod(levels))
    c = clean(counts)
    c = c.reshape(-1, c.shape[-1]).sum(0)
    if c.shape[-1] != K or c.sum() <= 0 or K > IMPLICIT_MAX_CODES:
        return {}
    idx = np.arange(K)
    basis = np.cumprod((1,) + tuple(levels[:-1]))
    used_share, sat = [], 0.0
    for d, L in enumerate(levels):
        digit = (idx // basis[d]) % L
        per_level = np.bincount(digit, weights=c, minlength=L)
        used_share.append(float((per_level > 0).sum()) / L)
        sat += float(per_level[0] + per_level[L - 1])
    return {"fsq_level_usage_min": min(used_share), "fsq_saturation": sat / (c.sum() * len(levels))}


def lfq_bit_balance(counts: np.ndarray, bits: int) -> dict[str, float]:
    """LFQ bit balance from code counts: min over bits of 2 min(p, 1 - p), p = P(bit = 1).

    Args:
        counts: `[H, K]` counts, K = 2**bits.
        bits: code bits.
    """
    c = clean(counts)
    c = c.reshape(-1, c.shape[-1]).sum(0)
    if c.shape[-1] != (1 << bits) or c.sum() <= 0 or (1 << bits) > IMPLICIT_MAX_CODES:
        return {}
    idx = np.arange(c.shape[-1])
    bal = []
    for b in range(bits):
        p = float(c[((idx >> b) & 1) == 1].sum() / c.sum())
        bal.append(2.0 * min(p, 1.0 - p))
    return {"lfq_bit_balance_min": min(bal)}


def implicit_usage(counts: np.ndarray, kind: str, codebook_size: int,
                   levels: tuple[int, ...] | list[int] | None) -> dict[str, float]:
    """FSQ level usage or LFQ bit balance of a quantizer of `kind`; {} for other kinds."""
    if kind == "fsq" and levels:
        return fsq_level_usage(counts, tuple(int(x) for x in levels))
    if kind == "lfq" and codebook_size > 1:
        return lfq_bit_balance(counts, int(round(math.log2(codebook_size))))
    return {}


def reachable_codes(codebook_size: float, tokens: float | None) -> float:
    """Codes a measurement of `tokens` draws can reach: K (1 - e^(-n/K)); K when n is unknown.

    Uniform draws of n tokens from K codes hit that many distinct codes on average, and the
    perplexity of such a draw is of the same size, so it is the ceiling relative floors are taken
    of. `tokens` None (EMA counts, which average many steps) gives K.
    """
    k = float(codebook_size)
    if tokens is None or not math.isfinite(tokens) or k <= 0:
        return k
    if tokens <= 0:
        return 0.0
    return k * -math.expm1(-tokens / k)


def auto_window(codebook_size: int, tokens_per_step: float) -> int:
    """Window length W (steps) for windowed usage when the user gives none.

    W = clamp(ceil(MIN_HITS_PER_CODE K / tokens_per_step), WINDOW_MIN, WINDOW_MAX): over W steps
    a code of a uniform usage is expected ~4 times, so P(a live code looks unused) ~ e^-4 ~ 2%.

    Args:
        codebook_size: K.
        tokens_per_step: indices per step per head (median over the first flush interval).
    """
    if not tokens_per_step or tokens_per_step <= 0 or not math.isfinite(tokens_per_step):
        return WINDOW_MIN
    w = math.ceil(MIN_HITS_PER_CODE * codebook_size / tokens_per_step)
    return int(min(max(w, WINDOW_MIN), WINDOW_MAX))


WINDOW_NAMES = ("usage_window", "usage_fraction", "dead_fraction", "entropy_norm_window",
                "perplexity_window", "window_tokens")
"""The windowed metrics `window_metrics` / `UsageWindow.compute` give."""
HIT_BASED = ("usage_window", "usage_fraction", "dead_fraction")
"""Windowed metrics that say which codes were never hit: meaningless until the window holds
MIN_HITS_PER_CODE x K vectors per head (`enough_tokens`)."""


def window_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Usage over a window of steps from the counts summed over it (`[..., H, K]`).

    Returns:
        name -> `[...]` arrays of WINDOW_NAMES: usage_window = usage_fraction (codes at or above
        DEAD_REL of the uniform share), dead_fraction, entropy_norm_window, perplexity_window, and
        window_tokens (counts per head, over the heads that saw any).
    """
    c = clean(counts)
    m = usage_metrics(c)
    n = c.sum(-1)
    return {"usage_window": m["usage_fraction"], "usage_fraction": m["usage_fraction"],
            "dead_fraction": m["dead_fraction"], "entropy_norm_window": m["entropy_norm"],
            "perplexity_window": m["perplexity"], "window_tokens": _head_mean(n, n)}


def enough_tokens(window_tokens: float, codebook_size: int) -> bool:
    """True when a window holds enough vectors per code for "never hit" to mean "dead"."""
    return not codebook_size or window_tokens >= MIN_HITS_PER_CODE * codebook_size


@dataclass
class UsageWindow:
    """Code counts summed over a span of steps: sum-mergeable state with `update` / `compute`.

    Counts of any source add up (steps of one rank, flush intervals, ranks), so a window over
    several ranks is the `merge` of their windows and its metrics are exact global usage.

    Attributes:
        counts: `[H, K]` summed counts (None before the first update).
        steps: number of steps summed.
        first_step: first step covered (None when unknown).
        last_step: last step covered (None when unknown).
    """

    counts: np.ndarray | None = None
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    _shape_mismatch: int = field(default=0, repr=False)

    def update(self, counts: np.ndarray, steps: int = 1, first_step: int | None = None,
               last_step: int | None = None) -> UsageWindow:
        """Add counts (`[H, K]`, or `[S, H, K]` summed over S) covering `steps` steps.

        Counts of another shape than the window's are ignored (and counted in `_shape_mismatch`).
        """
        c = clean(counts)
        if c.ndim == 1:
            c = c[None]
        if c.ndim == 3:
            c = c.sum(0)
        if self.counts is None:
            self.counts = c.copy()
        elif self.counts.shape == c.shape:
            self.counts = self.counts + c
        else:
            self._shape_mismatch += 1
            return self
        self.steps += int(steps)
        if first_step is not None:
            self.first_step = first_step if self.first_step is None else min(self.first_step, first_step)
        if last_step is not None:
            self.last_step = last_step if self.last_step is None else max(self.last_step, last_step)
        return self

    def merge(self, other: UsageWindow) -> UsageWindow:
        """A new window holding both, as consecutive spans (their steps add up; windows of the
        same steps on different ranks: `merge_ranks`)."""
        out = UsageWindow(None if self.counts is None else self.counts.copy(), self.steps,
                          self.first_step, self.last_step)
        if other.counts is not None:
            out.update(other.counts, other.steps, other.first_step, other.last_step)
        return out

    def compute(self) -> dict[str, float]:
        """WINDOW_NAMES over the summed counts (finite values only), plus window_steps."""
        if self.counts is None:
            return {}
        out = {k: float(v) for k, v in window_metrics(self.counts).items() if math.isfinite(float(v))}
        if self.steps:
            out["window_steps"] = float(self.steps)
        return out


def merge_ranks(windows: list[UsageWindow]) -> UsageWindow:
    """Windows of the same steps on different ranks: counts summed, steps not (one span)."""
    out = UsageWindow()
    for w in windows:
        if w.counts is None:
            continue
        steps = max(out.steps, w.steps)
        out.update(w.counts, 0, w.first_step, w.last_step)
        out.steps = steps
    return out
