"""Codebook geometry on tensors: deterministic code samples, pairwise distances (median and
nearest other code, near duplicates, in bounded blocks) and effective rank.

Same conventions as `vqdoctor.metrics.functional` (float64 where digits matter, inputs never
mutated), whose streaming block size these passes share.
"""

from __future__ import annotations

import numpy as np
import torch

from vqdoctor.metrics import functional as F

# Default seed of the deterministic code sample used for pairwise statistics on large codebooks,
# so two calls (codebook metrics, probe metrics, two checkpoints) see the same codes.
SAMPLE_SEED = 0
# Distances per block of `_pairwise_stats` (2**20 float32 = 4 MiB, 256 rows of 4096 codes):
# fastest single-threaded of 2**18..2**22, and 1 MiB blocks were 2-5x slower with two threads
# on a loaded VM (4x more parallel ops to synchronise).
PAIR_BLOCK_ELEMENTS = 2 ** 20


def sample_rows(n: int, max_rows: int | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Deterministic subset of row indices, sorted; None when all n rows are kept.

    Args:
        n: number of rows.
        max_rows: keep at most this many (None: keep all).
        generator: source of randomness (default: a generator seeded with SAMPLE_SEED).

    Returns:
        long `[max_rows]` indices, or None.
    """
    if max_rows is None or n <= max_rows:
        return None
    g = generator if generator is not None else torch.Generator().manual_seed(SAMPLE_SEED)
    return torch.randperm(n, generator=g)[:max_rows].sort().values


def sample_masked_rows(table: torch.Tensor, mask: torch.Tensor, max_rows: int | None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """The rows `sample_rows` would pick from `table[mask]`, gathered without copying `table[mask]`.

    Indices are sampled first and only the sampled rows are read, so a 65536 x 256 table with a
    4096-row sample copies 4 MiB, not 64 MiB; the rows (and their order) are those of
    `table[mask][sample_rows(mask.sum(), max_rows, generator)]`.

    Args:
        table: `[K, D]` rows.
        mask: bool `[K]`, rows eligible.
        max_rows: sample size bound (None: every masked row).
        generator: randomness for the sample.

    Returns:
        (`[min(n, max_rows), D]` rows, n = number of masked rows).
    """
    rows = mask.nonzero().squeeze(1)  # ascending, as boolean indexing orders them
    pick = sample_rows(int(rows.numel()), max_rows, generator)
    return table.index_select(0, rows if pick is None else rows[pick]), int(rows.numel())


def _pairwise_stats(x: torch.Tensor, n_live: int | None = None) -> tuple[float, torch.Tensor]:
    """Median off-diagonal distance and each row's nearest-other distance.

    With `n_live`, the first `n_live` rows are the only candidates for "nearest other" (every
    row's nearest *live* other row; +inf when there is none); the median still covers all pairs.
    Live rows first makes that a slice of each block, not a mask: no extra work.

    Rows are centred on the coordinate-wise median first: distances do not change, and the
    float32 `|a|^2 + |b|^2 - 2ab` expansion used here (as in cdist) keeps its error small
    relative to the spread of the codes even when all codes sit far from the origin or a few
    rows blew up. Each unordered pair is computed once: row block [s, e) against columns
    [s, k) (the upper triangle, half the work), its row and column minima both feeding
    `nearest`, and the pairs i < j copied into one k(k-1)/2 buffer whose lower median (an
    in-place selection, no sort) is the median over pairs i < j. Memory: that buffer (32 MiB
    for 4096 codes) and one reused block, where the full k x k matrix plus numpy's partitioned
    copy of it took 128 MiB.
    """
    k = x.shape[0]
    live = k if n_live is None else max(0, min(int(n_live), k))
    x = x.to(torch.float32)
    x = x - x.median(dim=0).values
    sq = (x * x).sum(-1)
    nearest = torch.full((k,), float("inf"), dtype=torch.float32)
    pairs = k * (k - 1) // 2
    upper = torch.empty(pairs, dtype=torch.float32)
    chunk = max(1, PAIR_BLOCK_ELEMENTS // max(k, 1))
    block = torch.empty(min(chunk, k) * k, dtype=torch.float32)  # reused: no per-block allocation
    inside = torch.ones(min(chunk, k), min(chunk, k), dtype=torch.bool).triu_(1)  # i < j in a block
    pos = 0
    for s in range(0, k, chunk):
        e = min(s + chunk, k)
        b = e - s
        d = block[:b * (k - s)].view(b, k - s)  # column c is code s + c
        torch.addmm(sq[s:].unsqueeze(0), x[s:e], x[s:].T, alpha=-2.0, out=d)
        d.add_(sq[s:e].unsqueeze(1)).clamp_min_(0.0).sqrt_()
        d.diagonal().fill_(float("inf"))  # (r, r) is code s + r against itself
        # amin, not min: no argmin indices (~10x faster on these blocks). Candidates are the
        # live columns [s, live) for the block's rows, and the block's live rows [s, min(e, live))
        # for the columns after it.
        if live > s:
            torch.minimum(nearest[s:e], d[:, :live - s].amin(dim=1), out=nearest[s:e])
        if e < k and live > s:  # pairs (i, j), i in the block, j after it: nearest for the j side too
            torch.minimum(nearest[e:], d[:min(e, live) - s, b:].amin(dim=0), out=nearest[e:])
        tri = d[:, :b][inside[:b, :b]]
        upper[pos:pos + tri.numel()] = tri
        pos += tri.numel()
        upper[pos:pos + b * (k - e)].view(b, k - e).copy_(d[:, b:])
        pos += b * (k - e)
    if not pairs:
        return float("nan"), nearest.to(torch.float64)
    # numpy's introselect is ~10x faster than torch.kthvalue on 8M floats (CPU); in place.
    mid = (pairs - 1) // 2
    buf = upper.numpy()
    buf.partition(mid)
    return float(buf[mid]), nearest.to(torch.float64)


def pairwise_summary(codebook: torch.Tensor, rel: float = 1e-2, max_codes: int | None = 4096,
                     generator: torch.Generator | None = None,
                     live: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Median inter-code distance and near-duplicate mask from one pairwise pass.

    See `median_pairwise_distance` and `near_duplicates`; both are computed on the same
    deterministic sample of at most `max_codes` codes.

    Args:
        codebook: `[K, D]` codes (finite rows only).
        rel: duplicate threshold as a fraction of the median distance.
        max_codes: sample size bound (the pairwise matrix is max_codes^2, built in chunks).
        generator: randomness for the sample.
        live: bool `[K]`, the codes that count as "another code" (e.g. codes in use by their
            EMA counts): a code is a duplicate when a live code other than itself is that close.
            None: every code. The median covers all pairs either way.

    Returns:
        (median distance, NaN for fewer than two codes; bool mask over the sampled codes, in
        sample order).
    """
    x = codebook.detach()
    idx = sample_rows(x.shape[0], max_codes, generator)
    if idx is not None:
        x = x[idx]
        live = live[idx] if live is not None else None
    if x.shape[0] < 2:
        return float("nan"), torch.zeros(x.shape[0], dtype=torch.bool)
    if live is None or bool(live.all()):
        med, nearest = _pairwise_stats(x)
    else:
        order = torch.argsort((~live).to(torch.uint8), stable=True)  # live rows first
        med, near_sorted = _pairwise_stats(x[order], int(live.sum()))
        nearest = torch.empty_like(near_sorted)
        nearest[order] = near_sorted
    return med, (nearest < rel * med) | (nearest == 0)


def median_pairwise_distance(codebook: torch.Tensor, max_codes: int | None = 4096,
                             generator: torch.Generator | None = None) -> float:
    """Median Euclidean distance between distinct codes: median_{i<j} |e_i - e_j|.

    Codes beyond `max_codes` are sampled deterministically (`sample_rows`). NaN for fewer than
    two codes. Pass finite rows only.

    Args:
        codebook: `[K, D]` codes.
        max_codes: sample size bound (the pairwise matrix is max_codes^2, built in chunks).
        generator: randomness for the sample.

    Returns:
        the median distance.
    """
    return pairwise_summary(codebook, 0.0, max_codes, generator)[0]


def near_duplicates(codebook: torch.Tensor, rel: float = 1e-2, max_codes: int | None = 4096,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes that have another code almost on top of them.

    dup_i = min_{j != i} |e_i - e_j| < rel * median_{a<b} |e_a - e_b|, or that distance is exactly
    0 (identical rows are duplicates even when the median is 0). Pairwise (in row blocks)
    within a deterministic sample of `max_codes` codes when K is larger, so the mask
    covers the sample and its mean estimates the duplicate fraction.

    Args:
        codebook: `[K, D]` codes (finite rows only).
        rel: distance threshold as a fraction of the median inter-code distance.
        max_codes: sample size bound.
        generator: randomness for the sample.

    Returns:
        bool `[min(K, max_codes)]`, True for near-duplicates (all False for K < 2).
    """
    return pairwise_summary(codebook, rel, max_codes, generator)[1]


def effective_rank(codebook: torch.Tensor, max_codes: int | None = None,
                   generator: torch.Generator | None = None) -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred codebook.

    erank = exp(-sum_i p_i log p_i), p_i = σ_i / sum_j σ_j, σ the singular values of E - mean(E).
    Between 1 and min(K, D); ≈ r for r equally strong directions. Computed from the eigenvalues
    of the D x D Gram matrix accumulated in float64 over row chunks, so a 65536 x 256 table
    needs no more than one chunk in float64 at a time. 0 for a table with no spread (all rows
    equal, e.g. an all-zero codebook awaiting k-means).

    Args:
        codebook: `[K, D]` codes (finite rows only).
        max_codes: use a deterministic sample of this many rows when K is larger (the spectrum
            of a row sample estimates the table's when K >> D).
        generator: randomness for the sample.

    Returns:
        the effective rank.
    """
    x = codebook.detach()
    idx = sample_rows(x.shape[0], max_codes, generator)
    if idx is not None:
        x = x[idx]
    k, d = x.shape
    if k == 0:
        return 0.0
    # Two passes over row chunks in float64 (mean, then centred Gram): no float64 copy of the
    # whole table, and cache-sized chunks.
    chunk = max(1, F.STREAM_ELEMENTS // max(d, 1))
    total = torch.zeros(d, dtype=torch.float64)
    for s in range(0, k, chunk):
        total += x[s:s + chunk].to(torch.float64).sum(0)
    mean = total / k
    gram = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, k, chunk):
        c = x[s:s + chunk].to(torch.float64) - mean
        gram.addmm_(c.T, c)
    if not bool(torch.isfinite(gram).all()):
        return 0.0
    # numpy's LAPACK call: torch 2.13's float64 eigvalsh took ~4 s on a 256 x 256 Gram here (CPU
    # build), numpy ~0.05 s.
    sv = torch.from_numpy(np.linalg.eigvalsh(gram.numpy())).clamp_min(0.0).sqrt()
    total = sv.sum()
    if not bool(total > 0) or not bool(torch.isfinite(total)):
        return 0.0
    return float(torch.exp(F.entropy(sv / total)))
