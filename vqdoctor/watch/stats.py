"""Host-side arithmetic of the watch: per-step and windowed usage metrics from code counts.

Everything here runs on numpy arrays copied out of the device at a flush (or read back from a
run store), never on live tensors, so it can be as slow and exact as it likes (float64).
Counts are `[..., H, K]`: H separate codebooks (heads) of K codes each. Per-head values are
averaged over the heads that saw any token, as the checkpoint metrics do.
"""

from __future__ import annotations

import math

import numpy as np

# A code is dead when its count over the window is below this fraction of a uniform share
# (the same relative definition as the checkpoint `dead_fraction`, see metrics.functional.dead_mask).
DEAD_REL = 0.01
# Bounds of the automatic usage window (steps): at least ~4 expected hits per code under uniform
# usage, never shorter than MIN (recent enough to be stable), never longer than MAX.
WINDOW_MIN = 100
# Vectors per code a window must hold before "never hit" means "dead" (~4 expected hits under
# uniform usage: P(a live code is missed) ~ e^-4 ~ 2%); auto_window aims at the same.
MIN_HITS_PER_CODE = 4.0
WINDOW_MAX = 5000
HIST_BUCKETS = 16


def auto_window(codebook_size: int, heads: int, tokens_per_step: float) -> int:
    """Window length W (steps) for windowed usage when the user gives none.

    W = clamp(ceil(4 K / tokens_per_step), WINDOW_MIN, WINDOW_MAX): over W steps a code of a
    uniform usage is expected ~4 times, so P(a live code looks unused) ~ e^-4 ~ 2%.

    Args:
        codebook_size: K.
        heads: H (each head sees every token).
        tokens_per_step: indices per step per head (median over the first flush interval).
    """
    if not tokens_per_step or tokens_per_step <= 0 or not math.isfinite(tokens_per_step):
        return WINDOW_MIN
    w = math.ceil(MIN_HITS_PER_CODE * codebook_size / tokens_per_step)
    return int(min(max(w, WINDOW_MIN), WINDOW_MAX))


def _entropy(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entropy in nats over the last axis, total count) of non-negative counts."""
    c = np.clip(np.nan_to_num(c.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
    n = c.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = c / np.where(n > 0, n, 1.0)[..., None]
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    return h, n


def _head_mean(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Mean over the head axis (last) of `x`, counting only heads with n > 0; NaN when none."""
    used = n > 0
    k = used.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, np.where(used, x, 0.0).sum(-1) / np.maximum(k, 1), np.nan)


def step_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step batch usage metrics.

    Args:
        counts: `[S, H, K]` code counts of S steps.

    Returns:
        name -> `[S]` arrays: tokens (indices per head, mean over heads), perplexity
        (exp H, mean over heads), perplexity_fraction, entropy_norm (H / log K), top1_share
        (largest share of one code, max over heads).
    """
    S, H, K = counts.shape
    h, n = _entropy(counts)                       # [S, H]
    ppl = np.exp(h)
    with np.errstate(divide="ignore", invalid="ignore"):
        top = np.where(n > 0, counts.max(-1) / np.where(n > 0, n, 1.0), np.nan)
    out = {
        "tokens": n.mean(-1),
        "perplexity": _head_mean(ppl, n),
        "entropy_norm": _head_mean(h / math.log(K) if K > 1 else np.ones_like(h), n),
        "top1_share": np.nanmax(np.where(n > 0, top, -np.inf), axis=-1),
    }
    out["top1_share"] = np.where(np.isfinite(out["top1_share"]), out["top1_share"], np.nan)
    out["perplexity_fraction"] = out["perplexity"] / K
    return out


def window_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Usage over a window of steps.

    Args:
        counts: `[..., H, K]` counts summed over the window.

    Returns:
        name -> `[...]` arrays: usage_window / usage_fraction (share of the H*K codes hit at least
        once), dead_fraction (share of codes below DEAD_REL x the uniform share, per head, averaged),
        entropy_norm_window, perplexity_window (mean over heads).
    """
    K = counts.shape[-1]
    c = np.clip(np.nan_to_num(counts.astype(np.float64)), 0.0, None)
    h, n = _entropy(c)
    hit = (c > 0).mean(-1)                                    # [..., H]
    dead = (c < DEAD_REL * (n / K)[..., None]).mean(-1)
    usage = _head_mean(hit, n)
    return {
        "usage_window": usage,
        "usage_fraction": usage,
        "dead_fraction": _head_mean(dead, n),
        "entropy_norm_window": _head_mean(h / math.log(K) if K > 1 else np.ones_like(h), n),
        "perplexity_window": _head_mean(np.exp(h), n),
        "window_tokens": _head_mean(n, n),
    }


def fsq_metrics(counts: np.ndarray, levels: tuple[int, ...]) -> dict[str, float]:
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
    c = np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0, None).reshape(-1, counts.shape[-1]).sum(0)
    if c.shape[-1] != K or c.sum() <= 0 or K > (1 << 22):
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


def lfq_metrics(counts: np.ndarray, bits: int) -> dict[str, float]:
    """LFQ bit balance from code counts: min over bits of 2 min(p, 1 - p), p = P(bit = 1).

    Args:
        counts: `[H, K]` counts, K = 2**bits.
        bits: code bits.
    """
    c = np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0, None).reshape(-1, counts.shape[-1]).sum(0)
    if c.shape[-1] != (1 << bits) or c.sum() <= 0 or bits > 22:
        return {}
    idx = np.arange(c.shape[-1])
    bal = []
    for b in range(bits):
        p = float(c[((idx >> b) & 1) == 1].sum() / c.sum())
        bal.append(2.0 * min(p, 1.0 - p))
    return {"lfq_bit_balance_min": min(bal)}


def usage_histogram(counts: np.ndarray, buckets: int = HIST_BUCKETS) -> list[float]:
    """Share of all assignments held by each 1/buckets of the codes, most used first.

    Same convention as the checkpoint histogram (`metrics.codebook.usage_histogram`): codes of
    each head sorted by count, split into min(buckets, K) near-equal groups, shares averaged over
    the heads that saw any token.

    Args:
        counts: `[H, K]` (or `[K]`) counts.
        buckets: number of buckets.

    Returns:
        the shares (summing to 1); [] without counts.
    """
    c = np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0, None)
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
