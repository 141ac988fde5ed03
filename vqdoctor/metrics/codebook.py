"""Checkpoint metrics: the CODEBOOK names of `metrics.names`, measured on one `QuantizerState`.

Everything here reads the normal form only (no files, no data). Per-head values are aggregated
so that one quantizer gives one number per name: fractions, entropies and perplexities are
averaged over heads; norm statistics pool the rows of every head. Non-finite values are counted
(`nonfinite_*`) and left out of every other statistic, so a half-NaN codebook still reports
the health of its finite half.
"""

from __future__ import annotations

import math

import torch

from vqdoctor.metrics import device
from vqdoctor.metrics import functional as F
from vqdoctor.metrics import geometry as G
from vqdoctor.metrics import usage as U
from vqdoctor.metrics.constants import BLOWUP_FACTOR, DEAD_ABS, DEAD_REL, NEAR_ZERO_REF, ZERO_REL
from vqdoctor.quantizers.base import QuantizerState

# Near-duplicate: nearest other code closer than 1% of the median inter-code distance. Copies of
# one vector (replacement from one sample, collapsed dead rows) sit at ~0; random codes come that
# close only in very low dimension (nearest-neighbour spacing ~ K^(-1/D): D = 1 with K > ~100,
# D = 2 with K > ~1e4), where the fraction over-counts.
DUPLICATE_REL = 1e-2
# Pairwise statistics on at most this many codes (a 4096^2 float32 distance matrix, chunked).
PAIRWISE_MAX_CODES = 4096
# lucidrains resets replaced codes' counts to exactly `reset_cluster_size`; a shared exact value
# counts as a reset value when at least this share of codes holds it.
REPLACED_MIN_SHARE = 0.05
# Deferred replacement leaves reset codes decaying below the reset value v on a ladder v γ^j: the
# first LADDER_STEPS rungs must each be shared by two or more codes, within LADDER_TOL (relative;
# a float32 EMA step rounds to ~1e-7, a few steps stay far below 1e-4).
LADDER_STEPS = 3
LADDER_TOL = 1e-4
# Effective rank from a deterministic sample of max(RANK_MAX_CODES, RANK_ROWS_PER_DIM * D) rows:
# a sample of n rows estimates the spectrum with relative eigenvalue spread ~sqrt(D / n)
# (Marchenko-Pastur), so n >= 16 D keeps that under 25%. Measured on 65536-row tables, 4096
# rows read at most 0.75% of D below the full table at D = 256 (isotropic, the worst case;
# 16384 rows: 0.15%) and within 0.05% of D for low-rank tables (rank 8 or D/4), against the
# 5%-of-D threshold of VQ009. For D <= 256 it is the pairwise sample itself (one gather).
RANK_MAX_CODES = 4096
RANK_ROWS_PER_DIM = 16
LOWP_DTYPES = {"float16", "bfloat16", "half"}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _reset_share(c: torch.Tensor, reset_value: float | None, ones_init: bool = True) -> float:
    """Share of codes (finite counts `c` of one head) holding the replacement reset value.

    `ones_init` False: zero-initialised counts (vector-quantize-pytorch >= 1.34), whose reset
    value is a ratio of the mean count, any size, and whose never-hit codes hold exactly 0.
    """
    k = c.numel()
    if k == 0:
        return 0.0
    if reset_value is not None:
        # Compare in float32: the stored buffer is float32 and config floats like 0.1 are not.
        hits = int((c.to(torch.float32) == torch.tensor(reset_value, dtype=torch.float32)).sum())
    else:
        nz = c[c != 0]
        if nz.numel() == 0:
            return 0.0
        values, n = torch.unique(nz, return_counts=True)
        i = int(n.argmax())
        v = float(values[i])
        # Never-used codes of a ones-initialised EMA all hold exactly γ^t < 1, so only values >= 1
        # are read as reset values when the library's reset value is not known.
        if (ones_init and v < 1.0) or int(n[i]) < max(2, math.ceil(REPLACED_MIN_SHARE * k)):
            return 0.0
        # Replacement resets every code below the threshold to the reset value (lucidrains: the
        # threshold itself by default), so right after it no code is below that value, unless the
        # library deferred part of the replacement (lucidrains >= 1.32 replaces at most one code
        # per batch vector): then the codes below are reset codes that missed the last rounds,
        # decaying by γ per step without a hit, and they sit on the ladder v γ, v γ^2, v γ^3, ...
        # A tie above the smallest count that is neither is something else (integer k-means bin
        # sizes that EMA decay 1.0 never moves, codes decaying in lockstep from equal starts).
        if v > float(c.min() if ones_init else nz.min()) and not _decay_ladder(values, n, i):
            return 0.0
        hits = int(n[i])
    # Every code equal is the initial state (lucidrains initialises counts to ones), not a reset.
    return 0.0 if hits == k else hits / k


def _decay_ladder(values: torch.Tensor, n: torch.Tensor, i: int) -> bool:
    """True when the tied counts just below `values[i]` = v are v γ, v γ^2, ..., v γ^LADDER_STEPS.

    γ is read from the most common value below v (the codes reset one step before the last and
    not picked again: codes hit since then sit off the ladder, at v γ + (1 - γ) hits, fewer of
    them); each further rung must be shared by two or more codes, within LADDER_TOL (float32 EMA
    rounding). Integer bin sizes cannot form it: the most common bin below a bin b is about b - 1,
    and b (1 - 1/b)^2 is not an integer (nor, times a common decay factor, any other bin).
    """
    v = float(values[i])
    below, nb = values[:i].to(torch.float64), n[:i]  # `unique` sorts ascending: below v
    tied = below[nb >= 2]
    if tied.numel() < LADDER_STEPS:
        return False
    g = float(below[int(nb.argmax())]) / v
    if not 0.0 < g < 1.0:
        return False
    for j in range(2, LADDER_STEPS + 1):
        rung = v * g ** j
        if not bool(((tied - rung).abs() <= LADDER_TOL * rung).any()):
            return False
    return True


def count_metrics(counts: torch.Tensor, reset_value: float | None = None,
                  ones_init: bool = True) -> dict[str, float]:
    """Usage metrics from EMA counts (`cluster_size`), averaged over heads.

    Produces count_total, count_expected, dead_fraction, dead_fraction_abs, usage_fraction,
    replaced_fraction and, when any count is positive, entropy_norm, perplexity,
    perplexity_fraction, top1_share.

    Args:
        counts: `[K]` or `[H, K]` counts (non-finite entries are ignored).
        reset_value: the library's replacement reset count when known (lucidrains
            `reset_cluster_size`, default `threshold_ema_dead_code`); else inferred.
        ones_init: the library starts counts at ones (see `_reset_share`).

    Returns:
        metric name -> value.
    """
    c = F.as_hk(counts.detach()).to(torch.float64)
    K = int(c.shape[-1])
    acc: dict[str, list[float]] = {}

    def add(name: str, v: float) -> None:
        acc.setdefault(name, []).append(float(v))

    for h in range(c.shape[0]):
        row = c[h]
        fin = row[torch.isfinite(row)]
        if fin.numel() == 0:
            continue
        total = float(fin.clamp_min(0).sum())
        add("count_total", total)
        add("count_expected", total / K)
        if total <= 0:  # zero-initialised counts never updated: no usage is known, none is dead
            continue
        # dead among the finite counts (non-finite ones are counted apart, nonfinite_cluster_size);
        # the distribution over all K codes (non-finite as 0): metrics.usage either way
        dead = U.dead_fraction(fin.numpy())
        add("dead_fraction", dead)
        add("dead_fraction_abs", float((fin < DEAD_ABS).double().mean()))
        add("usage_fraction", 1.0 - dead)
        add("replaced_fraction", _reset_share(fin, reset_value, ones_init))
        u = U.head_usage(row.numpy()[None])
        add("entropy_norm", float(u["entropy_norm"][0]))
        add("perplexity", float(u["perplexity"][0]))
        add("perplexity_fraction", float(u["perplexity"][0]) / K)
        add("top1_share", float(u["top1_share"][0]))
    return {k: m for k, v in acc.items() if (m := _mean(v)) is not None}


def usage_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-code weight for the reference norm: min(N_i, n/K) per head (non-finite -> 0).

    A code counts fully once it is used at its uniform share n/K, and in proportion below it.
    So untouched rows whose counts merely decay from their initial value (lucidrains <= 1.32
    starts them at 1) weigh a fraction of a used code each, and a code that took most inputs in
    a collapse weighs no more than any other used code. With uniform usage this is the plain
    median over codes. The watch computes the same on the device (`metrics.device.usage_weights`).

    Args:
        counts: `[H, K]` EMA counts.

    Returns:
        float64 `[H, K]` weights.
    """
    return device.usage_weights(counts.detach())


def _geometry(cb: torch.Tensor, cosine: bool, usage: torch.Tensor | None = None,
              never_selected: torch.Tensor | None = None) -> dict[str, float]:
    """Norm, spacing, redundancy and rank metrics of an `[H, K, D]` codebook.

    Args:
        cb: the codebook.
        cosine: compare l2-normalised rows (spacing, duplicates, rank).
        usage: `[H, K]` EMA counts, when known: the reference norm is then the median over
            codes weighted by usage up to the uniform share (`usage_weights`), so that codes the
            data do not use (decayed to ~0, blown up by zero-initialised counts, or still at a
            tiny initial scale while a few used codes have moved to the data) cannot shift the
            scale everything is judged by, however many of them there are, and neither can
            one code that took most inputs in a collapse (it sits at the data mean, often ~0).
            Duplicates then need a live code as the other code (`_redundancy`).
        never_selected: `[H, K]` rows of a gradient-trained codebook that kept their exact bits
            since an earlier table (no gradient reached them): without counts, the dead rows of
            `_redundancy` (untouched rows of one init are dead codes; an untouched copy of a
            code in use is the wasted duplicate).
    """
    out: dict[str, float] = {}
    H, K, D = cb.shape
    # A row is finite iff its norm is (row_norms recomputes float32 overflows in float64); the
    # mask is reused for every other count, so the table is scanned element-wise once.
    all_norms = F.row_norms(cb)
    row_ok = torch.isfinite(all_norms)
    bad_rows = int((~row_ok).sum())
    out["nonfinite_rows"] = float(bad_rows)
    out["nonfinite_codebook"] = float((~torch.isfinite(cb[~row_ok])).sum()) if bad_rows else 0.0
    norms = all_norms[row_ok]
    with_usage = usage is not None and usage.shape == row_ok.shape
    ref = 0.0
    if norms.numel():
        nz = norms[norms > 0]
        all_med = float(nz.median()) if nz.numel() else 0.0
        # Reference scale: the count-weighted median norm when counts are known, else the median
        # of non-zero rows. With lucidrains dead-code decay most rows can sit at ~0, with
        # zero-initialised EMA counts most can be blown up ~1e5x, and early in a run without
        # k-means most rows still hold their tiny initial values while the few used codes sit at
        # the data scale; in each case the median of all rows (or of rows merely above a dead
        # cut-off) is not the scale the encoder outputs are actually matched against.
        ref_w = None
        if with_usage:
            keep_w = row_ok & (all_norms > 0)
            ref_w = F.weighted_median(all_norms[keep_w], usage_weights(usage)[keep_w])
        ref = ref_w if ref_w is not None else all_med
        out["code_norm_median"] = ref
        out["code_norm_min"] = float(norms.min())
        out["code_norm_max"] = float(norms.max())
        # A reference far below every ordinary row means the codes in use sit at ~0 (an encoder
        # output that is exactly 0 leaves the origin as the only live code): against it every
        # other row would read as blown up by 1e10 or more. Zero-initialised counts inflate rows
        # by ~decay/eps (1e3-1e5 measured), so below NEAR_ZERO_REF x the median of all non-zero
        # rows there is no blow-up reference, and blowup_* stay unmeasured (as in `watch`).
        # A blown-up row is one the data left: counts known, only rows used below their uniform
        # share n/K count (a row far beyond the reference that the inputs keep choosing is where
        # the data are, e.g. the few codes that moved from a tiny init to the data scale).
        if ref > 0 and ref >= NEAR_ZERO_REF * all_med:
            big = all_norms > BLOWUP_FACTOR * ref
            if with_usage:
                c = torch.nan_to_num(usage.detach().to(torch.float64), nan=0.0, posinf=0.0).clamp_min(0.0)
                idle = row_ok & (c < c.sum(-1, keepdim=True) / max(K, 1))
                out["blowup_rows"] = float((big & idle).sum())
                out["blowup_ratio"] = float(all_norms[idle].max()) / ref if bool(idle.any()) else 0.0
            else:
                out["blowup_rows"] = float((big & row_ok).sum())
                out["blowup_ratio"] = float(norms.max()) / ref
        elif ref <= 0:
            out["blowup_rows"] = 0.0
        zero = int((norms < ZERO_REL * ref).sum()) if ref > 0 else int(norms.numel())
        out["zero_rows"] = float(zero)
        out["zero_row_fraction"] = zero / (H * K)

    # Spacing, duplicates and rank describe the rows at the codebook's working scale: blown-up
    # rows (zero-initialised EMA counts) would inflate the median spacing until ordinary rows
    # look like duplicates, and rows decayed to ~0 are dead codes, not redundant ones.
    keep = row_ok.clone()
    if norms.numel() and ref > 0 and not cosine:
        keep &= (all_norms <= BLOWUP_FACTOR * ref) & (all_norms >= ZERO_REL * ref)
    dead = F.dead_mask(usage, DEAD_REL) if with_usage else None
    if dead is None and never_selected is not None and never_selected.shape == row_ok.shape:
        dead = never_selected
    dups, meds, ranks, rank_fracs = [], [], [], []
    rank_rows = max(RANK_MAX_CODES, RANK_ROWS_PER_DIM * D)
    for h in range(H):
        # Sample first, then gather: the same rows pairwise_summary / effective_rank would
        # sample from cb[h][keep[h]], without copying the kept table (64 MiB for 65536 x 256)
        # or normalising rows that are never used (row-wise, so normalising after is the same).
        red = _redundancy(cb[h], keep[h], None if dead is None else dead[h], cosine)
        if red is None:
            continue
        med, dup, (x, n) = red
        meds.append(med)
        dups.append(dup)
        xr = x
        if min(n, rank_rows) != x.shape[0]:  # D > 256: a larger sample than the pairwise one
            xr = G.sample_masked_rows(cb[h], keep[h], rank_rows)[0]
            xr = F.l2normalize(xr.to(torch.float32)) if cosine else xr
        er = G.effective_rank(xr)
        ranks.append(er)
        rank_fracs.append(er / min(n, D))
    for name, vals in (("duplicate_fraction", dups), ("intercode_dist_median", meds),
                       ("effective_rank", ranks), ("effective_rank_fraction", rank_fracs)):
        if (m := _mean(vals)) is not None:
            out[name] = m
    return out


def _redundancy(table: torch.Tensor, keep: torch.Tensor, dead: torch.Tensor | None, cosine: bool
                ) -> tuple[float, float, tuple[torch.Tensor, int]] | None:
    """(median spacing, duplicate fraction, (pairwise sample, rows it was drawn from)) of one head.

    Over a deterministic sample of the kept rows: a code is a duplicate when another code lies
    closer than DUPLICATE_REL x the median pairwise distance (or on top of it). With counts
    (`dead`), only a *live* code counts as that other code: duplicates among dead rows (EMA rows
    decaying towards the origin together, untouched rows of one init) are dead codes, left to
    `dead_fraction`, while a dead row on top of a live one is redundancy (only one of them can win
    the argmin, and the counts say which is wasted: the dead row is counted, its live twin not),
    and so are exact copies among dead rows (a table initialised by sampling with replacement).
    The spacing scale stays the median over all kept rows, as without counts: live codes spread
    at a large scale around dead ones left at their init would otherwise set a threshold far
    above the spacing of the table.
    """
    x, n = G.sample_masked_rows(table, keep, PAIRWISE_MAX_CODES)
    if n < 2:
        return None
    if cosine:
        x = F.l2normalize(x.to(torch.float32))
    live = None
    if dead is not None:  # the sampled rows' flags: the rows sample_masked_rows gathered, in order
        rows = keep.nonzero().squeeze(1)
        pick = G.sample_rows(n, PAIRWISE_MAX_CODES)
        live = ~dead[rows if pick is None else rows[pick]]
    med, dup = G.pairwise_summary(x, DUPLICATE_REL, None, live=live)
    if live is not None and int((~live).sum()) > 1:
        # exact copies among the dead rows (a table sampled with replacement) stay redundancy:
        # at most one of a set of identical codes can ever win the argmin
        _, inv, cnt = torch.unique(x[~live], dim=0, return_inverse=True, return_counts=True)
        dup = dup.clone()
        dup[~live] |= cnt[inv] > 1
    return med, float(dup.double().mean()), (x, n)


def _ema_invariant(q: QuantizerState, dead: torch.Tensor | None) -> dict[str, float]:
    """Residual of embed ~ embed_avg / smoothed(cluster_size) over rows with finite inputs."""
    e = q.extra.get("raw_codebook", q.codebook)  # affine lucidrains: EMA tracks the raw table
    if not isinstance(e, torch.Tensor) or q.embed_avg is None or q.cluster_size is None:
        return {}
    e, m, n = F.as_hkd(e), F.as_hkd(q.embed_avg), F.as_hk(q.cluster_size)
    if e.shape != m.shape or n.shape != e.shape[:2]:
        return {}
    n_ok = torch.isfinite(n)
    # Non-finite counts would poison n = sum N for the whole head; smooth over the finite ones.
    n_clean = torch.where(n_ok, n, torch.zeros_like(n))
    r = F.ema_residual(e, m, n_clean, eps=q.eps if q.eps is not None else 1e-5,
                       smoothed=q.counts_smoothed, cosine=q.metric == "cosine",
                       rule=q.ema_rule or "laplace")
    # A non-finite element in e or m makes r non-finite, so this also drops those rows.
    ok = n_ok & torch.isfinite(r)
    out: dict[str, float] = {}
    if ok.any():
        out["ema_residual_median"] = float(r[ok].median())
        live = ok & ~dead if dead is not None else ok
        if live.any():
            out["ema_residual_max"] = float(r[live].max())
    return out


def _zero_count_rows(cb: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Share of the non-finite codebook rows whose stored EMA count is exactly 0.

    1 is the signature of `embed_avg / N` with no (or an underflowed) Laplace smoothing: the
    division makes Inf/NaN exactly where a code was never hit. NaN spreading from the inputs
    lands on codes that were hit, whose counts are positive.
    """
    if counts.shape != cb.shape[:2]:
        return {}
    bad = ~torch.isfinite(cb).all(-1)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return {}
    return {"nonfinite_rows_zero_count": float((bad & (counts == 0)).sum()) / n_bad}


def _dtype_name(d: object) -> str:
    return str(d).removeprefix("torch.")


def _optimizer(q: QuantizerState) -> dict[str, float]:
    """Fraction of codebook rows whose Adam second moment is exactly zero (never got a gradient)."""
    v = (q.optimizer or {}).get("exp_avg_sq")
    if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.numel() == 0:
        return {}
    D = q.dim
    if v.shape[-1] != D and v.ndim >= 2 and v.shape[-2] == D:  # [D, K] layouts (rosinality, Sonnet)
        v = v.transpose(-1, -2)
    rows = v.reshape(-1, v.shape[-1])
    return {"optim_rows_no_grad_fraction": float((rows == 0).all(-1).double().mean())}


def _positive_extra(q: QuantizerState, keys: tuple[str, ...]) -> float | None:
    """First positive number among `q.extra[key]` for `keys`."""
    for key in keys:
        v = q.extra.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return None


def _reset_value(q: QuantizerState) -> float | None:
    """The library's replacement reset count when the adapter or config says it (lucidrains:
    `reset_cluster_size`, defaulting to `threshold_ema_dead_code`). None under the eps-blend
    rule: vector-quantize-pytorch >= 1.34 resets to a ratio of the mean count at that step."""
    if q.ema_rule == "eps-blend":
        return _positive_extra(q, ("reset_value",))
    return _positive_extra(q, ("reset_value", "reset_cluster_size", "threshold_ema_dead_code"))


def codebook_metrics(q: QuantizerState, never_selected: torch.Tensor | None = None) -> dict[str, float]:
    """The CODEBOOK metrics (`metrics.names.CODEBOOK`) that apply to one quantizer.

    - always: codebook_size.
    - codebook stored (all but FSQ/LFQ): nonfinite_codebook, nonfinite_rows, code_norm_*,
      blowup_rows, blowup_ratio (when some row is non-zero), zero_rows, zero_row_fraction,
      duplicate_fraction, intercode_dist_median, effective_rank, effective_rank_fraction
      (cosine codebooks: spacing and rank of the l2-normalised rows, what the lookup compares).
    - `cluster_size` stored: count_total, count_expected, dead_fraction, dead_fraction_abs,
      usage_fraction, replaced_fraction, and entropy_norm, perplexity, perplexity_fraction,
      top1_share when some count is positive; nonfinite_cluster_size.
    - codebook and `cluster_size` with non-finite rows: nonfinite_rows_zero_count.
    - `embed_avg` stored: nonfinite_embed_avg; vq-ema with both EMA buffers: ema_residual_median,
      ema_residual_max; either EMA buffer: ema_lowp.
    - replace_threshold_to_expected when the replacement threshold is known (`extra`) and
      counts are positive.
    - nonfinite_total whenever a tensor was scanned; initted when the flag is stored;
      optim_rows_no_grad_fraction with Adam moments; fsq_levels_min for FSQ.

    Args:
        q: the quantizer in normal form.
        never_selected: rows bit-identical to an earlier table of the same run (`drift.unchanged_rows`),
            for the duplicates of a codebook without counts.

    Returns:
        metric name -> finite float.
    """
    out: dict[str, float] = {"codebook_size": float(q.codebook_size)}
    if q.levels:
        out["fsq_levels_min"] = float(min(q.levels))
    nonfinite = 0.0
    scanned = False
    dead = None
    if q.cluster_size is not None:
        dead = F.dead_mask(F.as_hk(q.cluster_size.detach()), DEAD_REL)
    if q.codebook is not None:
        cb = F.as_hkd(q.codebook.detach())
        usage = F.as_hk(q.cluster_size.detach()) if q.cluster_size is not None else None
        out.update(_geometry(cb, q.metric == "cosine", usage,
                             None if never_selected is None else never_selected.reshape(cb.shape[:2])))
        nonfinite += out["nonfinite_codebook"]
        scanned = True
    if q.cluster_size is not None:
        n = F.as_hk(q.cluster_size.detach())
        out["nonfinite_cluster_size"] = float((~torch.isfinite(n)).sum())
        nonfinite += out["nonfinite_cluster_size"]
        scanned = True
        out.update(count_metrics(n, _reset_value(q), ones_init=q.ema_rule != "eps-blend"))
        threshold = _positive_extra(q, ("threshold_ema_dead_code", "reset_value"))
        if q.ema_rule == "eps-blend":  # a ratio of the mean count: threshold / (n/K) is the ratio
            ratio = _positive_extra(q, ("dead_code_threshold_ratio",))
            t = _positive_extra(q, ("threshold_ema_dead_code",))
            if ratio is None and t is not None:  # the deprecated absolute form, converted as 1.34 does
                ratio = t / q.codebook_size if t >= 1 else t
            threshold = None if ratio is None else ratio * out.get("count_expected", 0.0)
        if threshold is not None and out.get("count_expected", 0.0) > 0:
            out["replace_threshold_to_expected"] = threshold / out["count_expected"]
    if q.codebook is not None and q.cluster_size is not None:
        out.update(_zero_count_rows(F.as_hkd(q.codebook.detach()), F.as_hk(q.cluster_size.detach())))
    if q.embed_avg is not None:
        out["nonfinite_embed_avg"] = float(F.nonfinite_count(q.embed_avg))
        nonfinite += out["nonfinite_embed_avg"]
        scanned = True
    if scanned:
        out["nonfinite_total"] = nonfinite
    if q.cluster_size is not None or q.embed_avg is not None:
        stored = [_dtype_name(q.dtypes.get(r, "")) for r in ("cluster_size", "embed_avg")]
        out["ema_lowp"] = 1.0 if any(d in LOWP_DTYPES for d in stored) else 0.0
    if q.is_ema:
        out.update(_ema_invariant(q, dead))
    if q.initted is not None:
        out["initted"] = 1.0 if q.initted else 0.0
    out.update(_optimizer(q))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def usage_histogram(q: QuantizerState, bins: int = U.HIST_BUCKETS) -> list[float]:
    """`metrics.usage.usage_histogram` of the stored EMA counts ([] when none are stored).

    Args:
        q: the quantizer in normal form.
        bins: number of groups.

    Returns:
        the shares (summing to 1), or [] when no counts are stored or all are zero.
    """
    if q.cluster_size is None or bins < 1:
        return []
    return U.usage_histogram(F.as_hk(q.cluster_size.detach()).to(torch.float64).numpy(), bins)
