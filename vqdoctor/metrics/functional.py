"""Small pure functions on tensors: the arithmetic under every vqdoctor metric.

Conventions: counts and codebooks may carry leading head dimensions (`[..., K]`, `[..., K, D]`);
reductions run over the last axis (counts) or the last two (codebooks). Results that feed ratios,
logs or medians are computed in float64, because EMA counts span 1e-30..1e5 and a float32 entropy
of a 65536-code distribution loses digits that `entropy_norm` thresholds care about. No function
here mutates its inputs or raises on non-finite values (they propagate or are documented).
"""

from __future__ import annotations

import math

import torch

# Elements per distance block: bounds the memory of chunked pairwise / nearest-code searches
# (2**24 float32 = 64 MiB).
BLOCK_ELEMENTS = 2 ** 24
# Elements per block of the streaming passes over a whole table (float64 EMA residuals, norm
# recomputes, Gram accumulation): 2**19 float64 = 4 MiB temporaries. 8192-row (16 MiB) float64
# blocks of a 65536 x 256 table ran ~6x slower than 1024-2048-row ones (each fresh block is
# page-faulted in and streams from RAM); much smaller blocks multiply the number of parallel
# ops, and each one waits for both OpenMP threads, which costs most on a loaded 2-core VM.
STREAM_ELEMENTS = 2 ** 19
# A float32 row norm below this may have lost digits to underflow (an element under ~1e-19
# squares below float32's normal range); such rows, and rows whose float32 sum of squares
# overflowed (|e| above ~1e19), are recomputed in float64 by `row_norms`.
F32_NORM_MIN = 1e-10


def as_hk(t: torch.Tensor) -> torch.Tensor:
    """Counts as `[H, K]` (a `[K]` vector is one head)."""
    return t.reshape(1, 1) if t.ndim == 0 else t.reshape(-1, t.shape[-1])


def as_hkd(t: torch.Tensor) -> torch.Tensor:
    """A codebook-shaped tensor as `[H, K, D]` (a `[K, D]` table is one head)."""
    return t.reshape(1, *t.shape) if t.ndim == 2 else t.reshape(-1, *t.shape[-2:])


def usage_distribution(counts: torch.Tensor) -> torch.Tensor:
    """Usage distribution of codes from (EMA or hard) counts.

    p_i = c_i / sum_j c_j with c = max(N, 0); non-finite counts are treated as 0. A row whose
    counts are all zero gives all-zero p (no usage is known), not NaN.

    Args:
        counts: `[..., K]` counts.

    Returns:
        float64 `[..., K]` distribution.
    """
    c = torch.nan_to_num(counts.detach().to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    total = c.sum(-1, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(c))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats along the last axis.

    H(p) = -sum_i p_i log p_i, with 0 * log 0 = 0.

    Args:
        p: `[..., K]` probabilities (rows summing to 1, or all zero).

    Returns:
        float64 `[...]` entropies.
    """
    p = p.to(torch.float64)
    return -torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny)), torch.zeros_like(p)).sum(-1)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """Perplexity of the usage distribution: exp(H(p)) with p = usage_distribution(counts).

    Ranges from 1 (one code) to K (uniform). All-zero counts give 1. It depends on how many
    tokens the counts summarise, so report it beside n and K
    (docs/ema-and-layouts.md#perplexity-and-usage-conventions).

    Args:
        counts: `[..., K]` counts.

    Returns:
        float64 `[...]` perplexities.
    """
    return torch.exp(entropy(usage_distribution(counts)))


def normalised_entropy(counts: torch.Tensor, K: int | None = None) -> torch.Tensor:
    """Normalised entropy H(p) / log K of the usage distribution.

    1 for uniform usage over K codes, 0 for a single code. With K = 1 there is nothing to
    spread over and the value is defined as 1.

    Args:
        counts: `[..., K]` counts.
        K: number of codes (default: `counts.shape[-1]`; pass it when counts cover only the codes seen).

    Returns:
        float64 `[...]` values in [0, 1].
    """
    K = int(counts.shape[-1]) if K is None else int(K)
    h = entropy(usage_distribution(counts))
    if K <= 1:
        return torch.ones_like(h)
    return h / math.log(K)


def dead_mask(counts: torch.Tensor, rel: float = 0.01, floor: float = 0.0) -> torch.Tensor:
    """Codes whose count is negligible relative to a uniform share.

    dead_i = N_i < rel * n / K  or  N_i <= floor, with n = sum_j N_j (finite, non-negative part).
    Relative, not absolute, because EMA counts scale with tokens per step: 0.5 is healthy at
    n/K = 1 and dead at n/K = 1000. Non-finite counts are not dead (they are counted separately
    as `nonfinite_cluster_size`); all-zero counts make every code dead.

    Args:
        counts: `[..., K]` counts.
        rel: fraction of the expected count n/K below which a code is dead.
        floor: counts at or below this are dead whatever n is.

    Returns:
        bool `[..., K]`.
    """
    c = counts.detach().to(torch.float64)
    finite = torch.isfinite(c)
    c0 = torch.where(finite, c, torch.zeros_like(c)).clamp_min(0.0)
    expected = c0.sum(-1, keepdim=True) / max(int(c.shape[-1]), 1)
    return finite & ((c < rel * expected) | (c <= floor))


def row_norms(codebook: torch.Tensor) -> torch.Tensor:
    """L2 norm of every code vector: |e_i| = sqrt(sum_d e_id^2).

    Summed in float32 (a float64 pass would first copy a 65536 x 256 table to 128 MiB of
    float64 and take ~20x longer); float32 keeps ~1e-7 relative accuracy, more than any
    norm statistic needs. Rows where float32 is not exact enough are recomputed in float64:
    a finite row whose squares overflow float32 (|e| > ~1e19, a blown-up row) would read
    +inf, i.e. non-finite, and a row of tiny values could underflow to 0. So a row's norm is
    finite iff all its elements are, as with a float64 sum. float64 input stays float64.

    Args:
        codebook: `[..., K, D]`.

    Returns:
        float64 `[..., K]` (NaN/Inf rows give NaN/Inf).
    """
    x = codebook.detach()
    if x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, dim=-1)
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).to(torch.float64)
    redo = (~torch.isfinite(norms) | (norms < F32_NORM_MIN)).view(-1).nonzero().squeeze(1)
    if redo.numel():
        flat, rows = norms.view(-1), x.reshape(-1, x.shape[-1])
        step = max(1, STREAM_ELEMENTS // max(x.shape[-1], 1))
        for s in range(0, redo.numel(), step):
            i = redo[s:s + step]
            flat[i] = torch.linalg.vector_norm(rows[i], dim=-1, dtype=torch.float64)
    return norms


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> float | None:
    """Lower weighted median: the smallest v_i with sum_{v_j <= v_i} w_j >= sum_j w_j / 2.

    With equal weights this is the lower median (`torch.median`). Entries whose value or weight
    is non-finite, or whose weight is <= 0, take no part.

    Args:
        values: `[n]` values.
        weights: `[n]` weights (e.g. EMA counts).

    Returns:
        the median, or None when no entry has a positive finite weight.
    """
    v, w = values.detach().reshape(-1).to(torch.float64), weights.detach().reshape(-1).to(torch.float64)
    ok = torch.isfinite(v) & torch.isfinite(w) & (w > 0)
    if not bool(ok.any()):
        return None
    v, w = v[ok], w[ok]
    order = torch.argsort(v)
    cum = torch.cumsum(w[order], 0)
    i = int(torch.searchsorted(cum, cum[-1] / 2))
    return float(v[order][min(i, v.numel() - 1)])


def nonfinite_count(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of `t`, without an element-wise mask of the whole tensor.

    A row sum is non-finite whenever one of its elements is (NaN and Inf propagate), so only
    rows whose sum is non-finite are checked element by element; a row whose sum merely
    overflowed is checked too and counts 0. One read of `t`, `[..., K]`-sized temporaries.

    Args:
        t: any tensor (non-floating dtypes have no non-finite values).

    Returns:
        the exact count.
    """
    t = t.detach()
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    rows = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
    suspect = ~torch.isfinite(rows.sum(-1))
    if not bool(suspect.any()):
        return 0
    return int((~torch.isfinite(rows[suspect])).sum())


def l2normalize(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last axis; zero vectors stay zero (what cosine lookups compare)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def laplace_smooth(counts: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Laplace-smoothed EMA counts, as every EMA VQ divides by them.

    Ñ_i = (N_i + ε) / (n + K ε) * n, with n = sum_j N_j. Keeps sum Ñ = n and Ñ_i > 0 for n > 0.

    Args:
        counts: `[..., K]` EMA counts N.
        eps: ε (1e-5 in most libraries, 1e-7 in VideoGPT/torchmultimodal).

    Returns:
        float64 `[..., K]` smoothed counts.
    """
    c = counts.detach().to(torch.float64)
    n = c.sum(-1, keepdim=True)
    return (c + eps) / (n + c.shape[-1] * eps) * n


# Norm floors of the l2-normalisation after the EMA division in cosine codebooks (lucidrains
# `l2norm`: F.normalize with eps 1e-6 at HEAD, torch's default 1e-12 in older releases).
COSINE_NORM_EPS = (1e-6, 1e-12)


# How an EMA codebook is computed from its statistics (`QuantizerState.ema_rule`; the libraries:
# docs/ema-and-layouts.md#library-variants):
# "laplace": embed = embed_avg / laplace_smooth(cluster_size) (Sonnet, encodec, taming,
#   vector-quantize-pytorch <= 1.32, ...; zalando stores the smoothed counts themselves);
# "eps-blend": embed = (embed_avg + eps * embed) / (cluster_size + eps) (vector-quantize-pytorch
#   >= 1.34: zero-initialised statistics, no smoothing across codes; an unused code keeps its row).
EMA_RULES = ("laplace", "eps-blend")


def ema_residual(embed: torch.Tensor, embed_avg: torch.Tensor, counts: torch.Tensor,
                 eps: float = 1e-5, smoothed: bool = False, cosine: bool = False,
                 rule: str = "laplace") -> torch.Tensor:
    """Per-row violation of the EMA invariant embed = embed_avg / smoothed(cluster_size).

    r_i = |e_i - t_i| / |e_i| with t_i = m_i / Ñ_i (Ñ = laplace_smooth(N, ε), or N itself when
    the stored counts are already smoothed, as in zalando), and t_i = l2norm(m_i / Ñ_i) for cosine
    codebooks (lucidrains normalises after the division, with a norm floor: `COSINE_NORM_EPS`). r = 0 where e_i == t_i (also both zero),
    +inf where e_i = 0 but t_i is not. A healthy EMA codebook gives r ≈ 0 (≤ 1e-5 with float32
    storage); a large r means edited weights, a different ε, a replaced row or a codebook that
    is not EMA-updated at all.

    Args:
        embed: `[..., K, D]` codebook.
        embed_avg: `[..., K, D]` EMA sums m.
        counts: `[..., K]` EMA counts N.
        eps: Laplace ε.
        smoothed: counts already hold Ñ.
        cosine: the codebook is stored l2-normalised.
        rule: "laplace" (above) or "eps-blend": e_new = (m + ε e_old) / (N + ε). The old row is
            not stored; with e_old = e_new the residual |e N - m| / ((N + ε) |e|) is exactly
            ε / (N + ε) times the row's relative move in its last update, so it is ~0 wherever the
            statistics and the row agree (also 0 for never-hit rows, N = m = 0); cosine:
            |l2norm(m + ε e) - e|.

    Returns:
        float64 `[..., K]` relative residuals.
    """
    blend = rule == "eps-blend"
    nt = counts.detach().to(torch.float64) if smoothed or blend else laplace_smooth(counts, eps)
    k, d = embed.shape[-2], embed.shape[-1]
    out = torch.empty(nt.shape, dtype=torch.float64)
    # float64 over small row blocks: the table may be 65536 x 256 and a float64 copy of it is
    # not needed; cache-sized blocks, updated in place, keep the pass memory-bound at float32
    # read speed (the arithmetic is the same element by element, so the result is too).
    step = max(1, STREAM_ELEMENTS // max(d * int(nt[..., :1].numel()), 1))
    for s in range(0, k, step):
        e = embed[..., s:s + step, :].detach().to(torch.float64)
        m = embed_avg[..., s:s + step, :].detach().to(torch.float64)
        n = nt[..., s:s + step].unsqueeze(-1)
        # the row the EMA would store: m / Ñ (Laplace), (m + eps e) / (n + eps) (eps-blend;
        # for a cosine lookup the common factor 1 / (n + eps) does not change the direction)
        x = m + eps * e if blend else m / n  # out of place: a float64 input is not copied by .to
        if cosine:
            # lucidrains' l2norm is F.normalize(eps=1e-6) (1e-12 in old releases): a row whose
            # target is shorter than eps (a long-dead code) is stored as target / eps, not unit.
            xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            num = torch.minimum(*(torch.linalg.vector_norm(x / xn.clamp_min(c) - e, dim=-1)
                                  for c in COSINE_NORM_EPS))
        else:
            num = torch.linalg.vector_norm(e - (x / (n + eps) if blend else x), dim=-1)
        out[..., s:s + step] = (num / torch.linalg.vector_norm(e, dim=-1)).masked_fill_(num == 0, 0.0)
    return out


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, metric: str = "euclidean",
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every input and its distance, without materialising N x K at once.

    euclidean: k_j = argmin_i |z_j - e_i| (searched as argmin_i |e_i|^2 - 2 z_j·e_i);
    cosine: k_j = argmax_i ẑ_j·ê_i with ẑ, ê l2-normalised, and the distance |ẑ_j - ê_k|.
    The distance of the chosen code is recomputed directly (no cancellation). Codes with
    non-finite elements are never chosen (distance +inf when no code is finite).

    Args:
        z: `[N, D]` inputs.
        codebook: `[K, D]` codes.
        metric: "euclidean" or "cosine".
        chunk: inputs per block (default: as many as fit BLOCK_ELEMENTS distances).

    Returns:
        (long `[N]` indices, float64 `[N]` distances).
    """
    z = z.detach().to(torch.float32)
    e = codebook.detach().to(torch.float32)
    if metric == "cosine":
        z, e = l2normalize(z), l2normalize(e)
    n, k = z.shape[0], e.shape[0]
    chunk = chunk or max(1, BLOCK_ELEMENTS // max(k, 1))
    # Non-finite codes can never be chosen (argmin would otherwise return the NaN's position).
    bad = ~torch.isfinite(row_norms(e))  # the row-norm pass also finds non-finite rows
    if bool(bad.any()):  # no zero-filled copy of the table when every code is finite
        e = e.masked_fill(bad.unsqueeze(-1), 0.0)
    e_sq = (e * e).sum(-1).masked_fill(bad, float("inf"))
    idx = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        zc = z[s:s + chunk]
        scores = torch.addmm(e_sq, zc, e.T, beta=1.0, alpha=-2.0)  # |e|^2 - 2 z·e
        idx[s:s + chunk] = scores.argmin(dim=1)
    dist = torch.linalg.vector_norm(z.to(torch.float64) - e[idx].to(torch.float64), dim=-1)
    return idx, dist.masked_fill(bad[idx], float("inf"))


def fsq_level_indices(z: torch.Tensor, levels: tuple[int, ...] | list[int],
                      preserve_symmetry: bool = False) -> torch.Tensor:
    """Per-dimension FSQ level index of each input, with vector-quantize-pytorch semantics.

    Default bound: h = (L - 1)(1 + 1e-3) / 2, o = 0.5 for even L else 0, s = atanh(o / h),
    level = round(tanh(z + s) h - o) + L // 2 ∈ {0..L-1}. Symmetry-preserving variant (needed
    for L = 2): level = floor((L - 1)(tanh z + 1) / 2 + 0.5).

    Args:
        z: `[N, d]` projected inputs, d = len(levels).
        levels: levels per dimension.
        preserve_symmetry: use the symmetry-preserving bound.

    Returns:
        long `[N, d]` level indices.
    """
    L = torch.tensor(list(levels), dtype=torch.float32)
    z = z.detach().to(torch.float32)
    if preserve_symmetry:
        lv = torch.floor((L - 1) * (torch.tanh(z) + 1) / 2 + 0.5)
    else:
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = torch.where(L.remainder(2) == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        lv = torch.round(torch.tanh(z + shift) * half_l - offset) + torch.floor(L / 2)
    return torch.minimum(lv.clamp_min(0), L - 1).long()


def fsq_indices(level_idx: torch.Tensor, levels: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Implicit-codebook index from per-dimension levels: k = sum_d level_d * prod_{d'<d} L_d'.

    Args:
        level_idx: long `[N, d]` from `fsq_level_indices`.
        levels: levels per dimension.

    Returns:
        long `[N]` code indices in [0, prod(levels)).
    """
    basis = torch.cumprod(torch.tensor([1, *list(levels)[:-1]], dtype=torch.long), 0)
    return (level_idx.long() * basis).sum(-1)


def lfq_indices(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ sign bits and code index (vector-quantize-pytorch: first dimension is the most significant bit).

    b_d = [z_d > 0], k = sum_d b_d 2^(d_total - 1 - d).

    Args:
        z: `[N, d]` projected inputs, d <= 62.

    Returns:
        (bool `[N, d]` bits, long `[N]` indices).
    """
    bits = z.detach() > 0
    d = bits.shape[-1]
    mask = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.long)
    return bits, (bits.long() * mask).sum(-1)
