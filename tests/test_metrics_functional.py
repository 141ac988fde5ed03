"""Pure metric functions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vqdoctor.metrics import functional as F
from vqdoctor.metrics import geometry as G


def test_usage_entropy_perplexity_by_hand():
    counts = torch.tensor([2.0, 2.0, 0.0, 0.0])
    assert F.usage_distribution(counts).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert float(F.entropy(F.usage_distribution(counts))) == pytest.approx(math.log(2))
    assert float(F.perplexity(counts)) == pytest.approx(2.0)
    assert float(F.normalised_entropy(counts)) == pytest.approx(0.5)  # ln 2 / ln 4
    assert F.dead_mask(counts).tolist() == [False, False, True, True]


def test_uniform_usage_has_perplexity_k():
    for k in (1, 7, 1024):
        counts = torch.full((k,), 3.0)
        assert float(F.perplexity(counts)) == pytest.approx(k)
        assert float(F.normalised_entropy(counts)) == pytest.approx(1.0)


def test_entropy_of_zeros_and_nonfinite_counts_is_defined():
    assert float(F.entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0
    assert F.usage_distribution(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert float(F.perplexity(torch.zeros(3))) == 1.0
    # NaN/Inf counts carry no mass: [1, 1, nan, inf] is two equally used codes.
    assert float(F.perplexity(torch.tensor([1.0, 1.0, float("nan"), float("inf")]))) == pytest.approx(2.0)


def test_per_head_reductions_keep_leading_dims():
    counts = torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert F.perplexity(counts).tolist() == pytest.approx([2.0, 4.0])


def test_dead_mask_is_relative_to_the_expected_count():
    # n = 2005.5, n/K = 501.375, 1% of it = 5.01: 5 and 0.5 are dead though far above 1e-3.
    counts = torch.tensor([1000.0, 1000.0, 5.0, 0.5])
    assert F.dead_mask(counts, rel=0.01).tolist() == [False, False, True, True]
    # ... and the verdict does not change with the token scale.
    assert F.dead_mask(counts * 1e-4, rel=0.01).tolist() == [False, False, True, True]
    assert F.dead_mask(torch.zeros(4)).tolist() == [True] * 4
    assert F.dead_mask(torch.tensor([4.0, float("nan"), 4.0, 0.0])).tolist() == [False, False, False, True]


def test_laplace_smoothing_worked_example():
    # N = [3, 1, 0], eps = 0.5: n = 4, n + K eps = 5.5, N~ = (N + 0.5) / 5.5 * 4.
    got = F.laplace_smooth(torch.tensor([3.0, 1.0, 0.0]), eps=0.5)
    assert got.tolist() == pytest.approx([3.5 / 5.5 * 4, 1.5 / 5.5 * 4, 0.5 / 5.5 * 4])
    assert float(got.sum()) == pytest.approx(4.0)


def _ema_run(steps: int, decay: float, eps: float, debias: bool, k: int = 6, d: int = 3):
    """EMA codebook built step by step with the equations of docs/ema-and-layouts.md#the-ema-update
    (Sonnet / zalando style)."""
    g = torch.Generator().manual_seed(1)
    n_hidden, m_hidden = torch.zeros(k, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64)
    for _ in range(steps):
        z = torch.randn(40, d, generator=g, dtype=torch.float64)
        assign = torch.randint(0, k - 2, (40,), generator=g)  # the last two codes are never used
        onehot = torch.nn.functional.one_hot(assign, k).to(torch.float64)
        n_hidden = decay * n_hidden + (1 - decay) * onehot.sum(0)
        m_hidden = decay * m_hidden + (1 - decay) * onehot.T @ z
    bias = (1 - decay ** steps) if debias else 1.0
    n, m = n_hidden / bias, m_hidden / bias
    return n, m


def test_ema_residual_sonnet_style_is_zero_and_an_edited_row_is_not():
    eps = 1e-5
    n, m = _ema_run(steps=20, decay=0.9, eps=eps, debias=True)
    e = m / F.laplace_smooth(n, eps).unsqueeze(-1)
    r = F.ema_residual(e.float(), m.float(), n.float(), eps=eps)
    assert float(r.max()) < 1e-5
    edited = e.clone()
    edited[1] *= 1.5
    r = F.ema_residual(edited, m, n, eps=eps)
    assert float(r[1]) == pytest.approx(0.5 / 1.5, rel=1e-6)  # |e - t| / |e| with e = 1.5 t
    assert float(r[0]) < 1e-12


def test_ema_residual_zalando_stores_smoothed_counts():
    eps = 1e-5
    n, m = _ema_run(steps=10, decay=0.99, eps=eps, debias=False)
    n_smooth = F.laplace_smooth(n, eps)
    e = m / n_smooth.unsqueeze(-1)
    assert float(F.ema_residual(e, m, n_smooth, eps=eps, smoothed=True).max()) < 1e-12


def test_ema_residual_cosine_compares_with_normalised_ratio():
    n, m = _ema_run(steps=5, decay=0.8, eps=1e-5, debias=False)
    e = F.l2normalize(m / F.laplace_smooth(n).unsqueeze(-1))
    assert float(F.ema_residual(e, m, n, cosine=True).max()) < 1e-12
    assert float(F.ema_residual(e, m, n, cosine=False).max()) > 0.1


def test_ema_residual_zero_rows():
    e = torch.zeros(2, 3)
    m = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    r = F.ema_residual(e, m, torch.tensor([1.0, 1.0]))
    assert float(r[0]) == 0.0 and math.isinf(float(r[1]))


def test_row_norms():
    assert F.row_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist() == [5.0, 0.0]


def test_row_norms_recompute_float32_overflow_and_underflow_rows():
    # float32 squares overflow above ~1.8e19 and underflow below ~1e-19: those rows are redone in
    # float64, so a finite row always has a finite, exact norm (a blown-up row is not non-finite).
    x = torch.tensor([[[3e20, 4e20], [3e-25, 4e-25], [3.0, 4.0]],
                      [[float("nan"), 1.0], [float("inf"), 0.0], [0.0, 0.0]]])
    n = F.row_norms(x)
    assert n.dtype == torch.float64 and n.shape == (2, 3)
    assert n[0].tolist() == pytest.approx([5e20, 5e-25, 5.0], rel=1e-6)
    assert math.isnan(float(n[1, 0])) and float(n[1, 1]) == math.inf and float(n[1, 2]) == 0.0
    torch.testing.assert_close(F.row_norms(x.double()), torch.linalg.vector_norm(x.double(), dim=-1),
                               rtol=0, atol=0, equal_nan=True)  # float64 input: one float64 pass
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 7, generator=g) * torch.logspace(-30, 30, 300).unsqueeze(1)
    assert torch.allclose(F.row_norms(y), torch.linalg.vector_norm(y.double(), dim=-1), rtol=1e-6)


def test_nonfinite_count_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 9, generator=g)
    assert F.nonfinite_count(x) == 0
    x[3, 1], x[3, 4], x[10, 0], x[49, 8] = float("nan"), float("inf"), -float("inf"), float("nan")
    x[20] = 3e38  # finite row whose sum overflows: checked element-wise, counts 0
    assert F.nonfinite_count(x) == 4 == int((~torch.isfinite(x)).sum())
    assert F.nonfinite_count(x.reshape(5, 10, 9)) == 4
    assert F.nonfinite_count(torch.tensor(float("nan"))) == 1 and F.nonfinite_count(torch.tensor(1.0)) == 0
    assert F.nonfinite_count(torch.ones(3, dtype=torch.long)) == 0 and F.nonfinite_count(torch.empty(0, 4)) == 0


def test_ema_residual_blocks_match_the_direct_float64_formula(monkeypatch):
    # Several row blocks (K not a multiple of the block) and two heads: blocking must not matter.
    g = torch.Generator().manual_seed(2)
    e, m = torch.randn(2, 37, 5, generator=g), torch.randn(2, 37, 5, generator=g)
    n = torch.rand(2, 37, generator=g) * 4
    monkeypatch.setattr(F, "STREAM_ELEMENTS", 40)  # 4 rows of 2 x 5 per block
    for cosine in (False, True):
        t = m.double() / F.laplace_smooth(n).unsqueeze(-1)
        t = F.l2normalize(t) if cosine else t
        want = torch.linalg.vector_norm(e.double() - t, dim=-1) / torch.linalg.vector_norm(e.double(), dim=-1)
        assert torch.allclose(F.ema_residual(e, m, n, cosine=cosine), want, rtol=1e-12, atol=0)


def test_effective_rank_of_rank_two_codebook():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 2, generator=g))
    cb = torch.randn(4096, 2, generator=g) @ basis.T + 3.0  # offset: centring must remove it
    assert G.effective_rank(cb) == pytest.approx(2.0, abs=0.05)
    assert G.effective_rank(torch.randn(8192, 16, generator=g)) > 15.0
    assert G.effective_rank(torch.zeros(10, 4)) == 0.0


def test_median_pairwise_distance_by_hand():
    # points 0, 1, 3 on a line: distances 1, 3, 2 -> median 2
    assert G.median_pairwise_distance(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)
    assert math.isnan(G.median_pairwise_distance(torch.zeros(1, 3)))


def test_near_duplicates():
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(64, 8, generator=g) + 100.0  # far from the origin: cdist precision matters
    cb[5] = cb[3] + 1e-4
    cb[9] = cb[7]
    dup = G.near_duplicates(cb, rel=1e-2)
    assert sorted(torch.nonzero(dup).flatten().tolist()) == [3, 5, 7, 9]
    assert not G.near_duplicates(torch.zeros(1, 4)).any()
    assert G.near_duplicates(torch.zeros(5, 4)).all()  # identical rows, median distance 0


@pytest.mark.parametrize("k", [2, 3, 4, 9, 50])
def test_pairwise_stats_match_brute_force_across_blocks(monkeypatch, k):
    # Upper-triangle row blocks (3 rows each here) against the full float64 distance matrix:
    # median over pairs i < j (lower median) and every row's nearest other code.
    g = torch.Generator().manual_seed(k)
    cb = torch.randn(k, 6, generator=g) + 50.0
    if k > 4:
        cb[4] = cb[1]
    monkeypatch.setattr(G, "PAIR_BLOCK_ELEMENTS", 3 * k)
    med, dup = G.pairwise_summary(cb, rel=1e-2, max_codes=None)
    d = torch.cdist(cb.double(), cb.double())
    pairs = d[torch.ones(k, k, dtype=torch.bool).triu(1)].sort().values
    assert med == pytest.approx(float(pairs[(pairs.numel() - 1) // 2]), rel=1e-5)
    nearest = (d + torch.diag(torch.full((k,), math.inf, dtype=torch.float64))).min(1).values
    _, got = G._pairwise_stats(cb)
    assert torch.allclose(got, nearest, rtol=1e-5, atol=1e-4)
    assert dup.tolist() == (nearest < 1e-2 * med).tolist()


def test_sample_masked_rows_equals_sampling_the_masked_table():
    g = torch.Generator().manual_seed(0)
    table, mask = torch.randn(1000, 3, generator=g), torch.rand(1000, generator=g) > 0.3
    want = table[mask][G.sample_rows(int(mask.sum()), 100)]
    got, n = G.sample_masked_rows(table, mask, 100)
    assert n == int(mask.sum()) and torch.equal(got, want)
    assert torch.equal(G.sample_masked_rows(table, mask, None)[0], table[mask])


def test_sampling_is_deterministic_and_bounded():
    cb = torch.randn(5000, 4)
    a = G.median_pairwise_distance(cb, max_codes=300)
    assert a == G.median_pairwise_distance(cb, max_codes=300)
    assert G.near_duplicates(cb, max_codes=300).shape == (300,)
    assert G.sample_rows(10, 20) is None


def test_nearest_codes_euclidean_vs_cosine():
    cb = torch.tensor([[1.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[2.0, 1.5]])
    idx, dist = F.nearest_codes(z, cb, "euclidean")
    assert idx.tolist() == [0] and float(dist[0]) == pytest.approx(math.hypot(1.0, 1.5))
    idx, dist = F.nearest_codes(z, cb, "cosine")  # direction (0.8, 0.6) is closer to (1, 1) / sqrt 2
    assert idx.tolist() == [1]
    s = 1 / math.sqrt(2)
    assert float(dist[0]) == pytest.approx(math.hypot(0.8 - s, 0.6 - s), rel=1e-6)


def test_nearest_codes_chunked_matches_brute_force_and_skips_nan_codes():
    z, cb = torch.randn(1000, 8), torch.randn(50, 8)
    want = torch.cdist(z, cb).argmin(1)
    for chunk in (None, 7, 1000):
        assert torch.equal(F.nearest_codes(z, cb, chunk=chunk)[0], want)
    cb[want[0]] = float("nan")
    idx, dist = F.nearest_codes(z[:1], cb)
    assert int(idx[0]) != int(want[0]) and math.isfinite(float(dist[0]))


def test_fsq_level_indices_by_hand():
    # L = 5 (odd): bound tanh(z) * 2.002, round, + 2. z = 0 -> 2; z = 10 -> 4; z = -10 -> 0.
    lv = F.fsq_level_indices(torch.tensor([[0.0], [10.0], [-10.0]]), [5])
    assert lv.flatten().tolist() == [2, 4, 0]
    # index = l0 + 8 * l1 for levels (8, 5)
    assert F.fsq_indices(torch.tensor([[3, 2]]), [8, 5]).tolist() == [3 + 8 * 2]


def test_lfq_indices_msb_first():
    bits, idx = F.lfq_indices(torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]]))
    assert bits.tolist() == [[True, False, True], [False, False, False]]
    assert idx.tolist() == [0b101, 0]


@pytest.mark.parametrize("rule", F.EMA_RULES)
@pytest.mark.parametrize("cosine", [False, True])
def test_ema_residual_leaves_float64_inputs_alone(rule, cosine):
    # `.to(torch.float64)` returns a float64 input itself: the blocks must not be updated in place
    g = torch.Generator().manual_seed(3)
    e, m = torch.randn(2, 9, 4, generator=g, dtype=torch.float64), torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    n = torch.rand(2, 9, generator=g, dtype=torch.float64) * 3
    before = (e.clone(), m.clone(), n.clone())
    F.ema_residual(e, m, n, cosine=cosine, rule=rule)
    assert all(torch.equal(a, b) for a, b in zip(before, (e, m, n), strict=True))
