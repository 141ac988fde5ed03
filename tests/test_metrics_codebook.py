"""Checkpoint metrics of one quantizer in normal form, on hand-built and real-library states."""

from __future__ import annotations

import math

import pytest
import torch

from tests.libs import LUCIDRAINS_ZERO_INIT
from vqdoctor.metrics import functional as F
from vqdoctor.metrics import geometry as G
from vqdoctor.metrics.codebook import codebook_metrics, usage_histogram, usage_weights
from vqdoctor.metrics.names import CODEBOOK
from vqdoctor.quantizers.base import QuantizerState

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library


def state(codebook=None, counts=None, embed_avg=None, kind="vq-ema", **kw) -> QuantizerState:
    cb = None if codebook is None else F.as_hkd(codebook)
    k = cb.shape[1] if cb is not None else F.as_hk(counts).shape[-1]
    d = cb.shape[2] if cb is not None else 1
    return QuantizerState("quantizer", kind, "generic", k, d, codebook=cb,
                          cluster_size=None if counts is None else F.as_hk(counts),
                          embed_avg=None if embed_avg is None else F.as_hkd(embed_avg), **kw)


def ema_state(k=32, d=4, seed=0, **kw) -> QuantizerState:
    """An EMA state that satisfies the invariant exactly (e = m / N~)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.rand(k, generator=g) * 10 + 1
    e = torch.randn(k, d, generator=g)
    m = e.double() * F.laplace_smooth(counts).unsqueeze(-1)
    return state(e, counts, m.float(), **kw)


def check_names(m: dict[str, float]) -> None:
    assert set(m) <= set(CODEBOOK), set(m) - set(CODEBOOK)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m


def test_counts_two_of_four_used():
    m = codebook_metrics(state(torch.randn(4, 3), torch.tensor([2.0, 2.0, 0.0, 0.0]), kind="vq"))
    check_names(m)
    assert m["perplexity"] == pytest.approx(2.0)
    assert m["entropy_norm"] == pytest.approx(0.5)
    assert m["dead_fraction"] == 0.5 and m["usage_fraction"] == 0.5
    assert m["dead_fraction_abs"] == 0.5
    assert m["perplexity_fraction"] == pytest.approx(0.5)
    assert m["top1_share"] == pytest.approx(0.5)
    assert m["count_total"] == 4.0 and m["count_expected"] == 1.0


def test_uniform_counts_and_head_averaging():
    m = codebook_metrics(state(torch.randn(64, 3), torch.full((64,), 5.0)))
    assert m["perplexity"] == pytest.approx(64) and m["entropy_norm"] == pytest.approx(1.0)
    heads = torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    m = codebook_metrics(state(torch.randn(2, 4, 3), heads))
    assert m["perplexity"] == pytest.approx(3.0)  # mean of 2 and 4
    assert m["dead_fraction"] == pytest.approx(0.25)


def test_story_tiny_nonzero_counts_are_dead():
    # 300 codes with tiny non-zero counts next to a handful holding everything (the user story,
    # docs/contract.md#the-user-story).
    counts = torch.cat([torch.full((4,), 250.0), torch.full((300,), 1e-2), torch.zeros(208)])
    m = codebook_metrics(state(torch.randn(512, 8), counts))
    assert m["dead_fraction"] == pytest.approx(508 / 512)
    assert m["dead_fraction_abs"] == pytest.approx(208 / 512)  # the absolute floor misses them
    pb, ps = 250 / 1003, 0.01 / 1003
    assert m["perplexity"] == pytest.approx(math.exp(-4 * pb * math.log(pb) - 300 * ps * math.log(ps)))


def test_blowup_and_zero_rows():
    cb = torch.randn(100, 8)
    cb[7] *= 1e5
    cb[8:11] = 0.0
    m = codebook_metrics(state(cb, kind="vq"))
    check_names(m)
    assert m["blowup_rows"] == 1.0
    assert m["blowup_ratio"] > 1e4
    assert m["zero_rows"] == 3.0 and m["zero_row_fraction"] == pytest.approx(0.03)
    # Zero rows do not drag the reference scale down (exact-zero rows are excluded).
    assert m["code_norm_median"] == pytest.approx(float(F.row_norms(cb)[F.row_norms(cb) > 0].median()))
    assert m["code_norm_min"] == 0.0


def test_a_row_blown_up_past_float32_squares_is_finite_not_nonfinite():
    # |e| ~ 1e20: its float32 sum of squares overflows, but the row is finite (float64 recompute).
    cb = torch.randn(100, 8)
    cb[7] = 1e20
    m = codebook_metrics(state(cb, kind="vq"))
    assert m["nonfinite_rows"] == 0.0 and m["nonfinite_codebook"] == 0.0
    assert m["blowup_rows"] == 1.0 and m["code_norm_max"] == pytest.approx(1e20 * math.sqrt(8), rel=1e-6)


def test_geometry_samples_the_kept_rows_like_the_functions_do():
    # K above the pairwise sample: spacing, duplicates and rank are those of the functions run on
    # the kept (non-zero, non-blown-up) rows, with the same deterministic 4096-row sample.
    g = torch.Generator().manual_seed(5)
    cb = torch.randn(5000, 8, generator=g)
    cb[10:20] = 0.0
    cb[30] *= 1e4
    cb[40:44] = cb[50]
    keep = torch.ones(5000, dtype=torch.bool)
    keep[10:20] = False
    keep[30] = False
    m = codebook_metrics(state(cb, kind="vq"))
    med, dup = G.pairwise_summary(cb[keep], 1e-2, 4096)
    assert m["intercode_dist_median"] == med
    assert m["duplicate_fraction"] == float(dup.double().mean())
    assert m["effective_rank"] == G.effective_rank(cb[keep], 4096)
    assert m["effective_rank_fraction"] == pytest.approx(m["effective_rank"] / 8)


def test_reference_norm_is_weighted_by_usage():
    # Early in a run without k-means (lucidrains, ones-initialised counts): 200 codes never
    # selected still hold their tiny initial rows, 24 used codes sit at the data scale. The
    # scale inputs are matched against is the used codes', so nothing is "blown up".
    g = torch.Generator().manual_seed(0)
    cb = torch.cat([torch.randn(24, 16, generator=g) * 8, torch.randn(200, 16, generator=g) * 0.01])
    counts = torch.cat([torch.full((24,), 40.0), torch.full((200,), 0.8 ** 5)])
    m = codebook_metrics(state(cb, counts))
    assert m["code_norm_median"] == pytest.approx(F.weighted_median(F.row_norms(cb), usage_weights(counts)))
    assert m["code_norm_median"] > 10 and m["blowup_rows"] == 0.0
    # Without counts the plain median is all there is.
    assert codebook_metrics(state(cb, kind="vq"))["code_norm_median"] < 1
    # A collapse: one code near the data mean (norm ~0.1) took 90% of the inputs; it weighs as
    # one used code, so the scale stays that of the codes in use (~8), not ~0.1.
    cb = torch.cat([torch.full((1, 16), 0.025), torch.randn(63, 16, generator=g) * 2])
    counts = torch.cat([torch.tensor([900.0]), torch.full((63,), 100 / 63)])
    m = codebook_metrics(state(cb, counts))
    assert 5 < m["code_norm_median"] < 12 and m["blowup_rows"] == 0.0
    assert usage_weights(counts).tolist() == pytest.approx([1000 / 64] + [100 / 63] * 63)


def test_weighted_median():
    v = torch.tensor([3.0, 1.0, 2.0, 100.0])
    assert F.weighted_median(v, torch.ones(4)) == 2.0  # lower median, like torch.median
    assert F.weighted_median(v, torch.tensor([0.0, 0.0, 1.0, 5.0])) == 100.0
    assert F.weighted_median(v, torch.tensor([1.0, float("nan"), -1.0, 0.0])) == 3.0
    assert F.weighted_median(v, torch.zeros(4)) is None


def test_nan_rows_are_counted_and_the_finite_part_is_measured():
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(50, 6, generator=g)
    counts = torch.rand(50, generator=g) + 0.5
    clean = codebook_metrics(state(cb[2:].clone(), counts[2:].clone(), kind="vq"))
    bad_cb, bad_counts = cb.clone(), counts.clone()
    bad_cb[0, 3] = float("nan")
    bad_cb[1] = float("inf")
    bad_counts[0] = float("nan")
    m = codebook_metrics(state(bad_cb, bad_counts, kind="vq"))
    check_names(m)
    assert m["nonfinite_codebook"] == 7.0 and m["nonfinite_rows"] == 2.0
    assert m["nonfinite_cluster_size"] == 1.0 and m["nonfinite_total"] == 8.0
    for name in ("code_norm_median", "code_norm_max", "intercode_dist_median", "effective_rank"):
        assert m[name] == pytest.approx(clean[name], rel=1e-6), name
    assert 0.0 < m["entropy_norm"] <= 1.0 and m["perplexity"] > 40


def test_all_nan_codebook_does_not_crash():
    m = codebook_metrics(state(torch.full((8, 4), float("nan")), torch.full((8,), float("nan"))))
    check_names(m)
    assert m["nonfinite_rows"] == 8.0 and m["nonfinite_total"] == 32.0 + 8.0
    assert "perplexity" not in m and "code_norm_median" not in m


def test_all_zero_codebook_awaiting_kmeans():
    m = codebook_metrics(state(torch.zeros(1, 16, 4), torch.zeros(1, 16), torch.zeros(1, 16, 4), initted=False))
    check_names(m)
    assert m["initted"] == 0.0
    assert m["zero_rows"] == 16.0 and m["code_norm_median"] == 0.0
    assert m["effective_rank"] == 0.0 and m["count_total"] == 0.0
    # nothing counted yet: no usage is known, so no code is known to be dead
    assert "blowup_ratio" not in m and "perplexity" not in m and "dead_fraction" not in m


@pytest.mark.parametrize("k,d", [(1, 1), (1, 8), (5, 1)])
def test_degenerate_shapes(k, d):
    m = codebook_metrics(state(torch.randn(k, d), torch.ones(k)))
    check_names(m)
    assert m["perplexity"] == pytest.approx(k)
    assert m["entropy_norm"] == pytest.approx(1.0)


def test_implicit_codebooks_give_only_what_applies():
    fsq = QuantizerState("fsq", "fsq", "vector-quantize-pytorch", 1000, 3, levels=(10, 10, 10))
    assert codebook_metrics(fsq) == {"codebook_size": 1000.0, "fsq_levels_min": 10.0}
    lfq = QuantizerState("lfq", "lfq", "vector-quantize-pytorch", 2 ** 10, 10)
    assert codebook_metrics(lfq) == {"codebook_size": 1024.0}


def test_duplicates_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(32, 8, generator=g)
    cb[1:4] = cb[0]  # four copies of one vector
    m = codebook_metrics(state(cb, kind="vq"))
    assert m["duplicate_fraction"] == pytest.approx(4 / 32)
    low = torch.randn(256, 2, generator=g) @ torch.linalg.qr(torch.randn(16, 2, generator=g))[0].T
    m = codebook_metrics(state(low, kind="vq"))
    assert m["effective_rank"] == pytest.approx(2.0, abs=0.1)
    assert m["effective_rank_fraction"] == pytest.approx(m["effective_rank"] / 16)


def test_cosine_duplicates_are_directions():
    cb = torch.randn(16, 4)
    cb[1] = 3.0 * cb[0]  # same direction, different norm: one code for a cosine lookup
    assert codebook_metrics(state(cb, kind="vq", metric="cosine"))["duplicate_fraction"] == pytest.approx(2 / 16)
    assert codebook_metrics(state(cb, kind="vq"))["duplicate_fraction"] == 0.0


def test_ema_invariant_holds_and_an_edited_row_breaks_it():
    st = ema_state()
    m = codebook_metrics(st)
    check_names(m)
    assert m["ema_residual_max"] < 1e-5
    st.codebook[0, 3] *= 2.0
    m = codebook_metrics(st)
    assert m["ema_residual_max"] == pytest.approx(0.5, rel=1e-4)
    assert m["ema_residual_median"] < 1e-5
    st.kind = "vq"  # a gradient-trained codebook has no invariant to check
    assert "ema_residual_max" not in codebook_metrics(st)


def test_ema_invariant_on_a_trained_lucidrains_codebook():
    vq_mod = pytest.importorskip("vector_quantize_pytorch")
    vq = vq_mod.VectorQuantize(dim=8, codebook_size=32, decay=0.9)
    vq.train()
    for _ in range(5):
        vq(torch.randn(2, 64, 8))
    cb = vq._codebook
    st = QuantizerState("vq", "vq-ema", "vector-quantize-pytorch", 32, 8, codebook=cb.embed.clone(),
                        cluster_size=cb.cluster_size.clone(), embed_avg=cb.embed_avg.clone(), eps=1e-5,
                        ema_rule="eps-blend" if LUCIDRAINS_ZERO_INIT else "laplace")
    m = codebook_metrics(st)
    assert m["ema_residual_max"] < 1e-5
    # the counts relax toward 128 tokens per step from their initial sum: 32 (ones) before 1.34,
    # 0 since: c0 g^5 + 128 (1 - g^5)
    c0 = 0 if LUCIDRAINS_ZERO_INIT else 32
    assert m["count_total"] == pytest.approx(c0 * 0.9 ** 5 + 128 * (1 - 0.9 ** 5), rel=1e-4)
    st.ema_rule = "eps-blend" if st.ema_rule == "laplace" else "laplace"  # the other version's arithmetic
    assert codebook_metrics(st)["ema_residual_max"] > 1e-5
    st.codebook[0, 5] += 10.0  # a row edited by hand
    assert codebook_metrics(st)["ema_residual_max"] > 1.0


def test_ema_low_precision_and_initted():
    st = ema_state(dtypes={"cluster_size": "torch.bfloat16", "embed_avg": "float32"}, initted=True)
    m = codebook_metrics(st)
    assert m["ema_lowp"] == 1.0 and m["initted"] == 1.0
    assert codebook_metrics(ema_state())["ema_lowp"] == 0.0


def test_replaced_fraction():
    g = torch.Generator().manual_seed(0)
    counts = torch.rand(100, generator=g) * 5 + 3
    counts[:10] = 2.0  # lucidrains reset to exactly threshold_ema_dead_code
    assert codebook_metrics(state(torch.randn(100, 4), counts))["replaced_fraction"] == pytest.approx(0.10)
    # Never-used codes of a ones-initialised EMA share decay**t < 1: not replacements.
    never = counts.clone()
    never[:50] = torch.tensor(1.0).lerp(torch.tensor(0.0), 0.2).lerp(torch.tensor(0.0), 0.2)
    never[:10] = never[10]
    assert codebook_metrics(state(torch.randn(100, 4), never))["replaced_fraction"] == 0.0
    # The untouched initial state (all ones) is not a replacement either.
    assert codebook_metrics(state(torch.randn(100, 4), torch.ones(100)))["replaced_fraction"] == 0.0
    # Ties above the smallest count are not resets (replacement leaves no code below the reset
    # value): integer k-means bin sizes frozen by decay 1.0, codes decaying in lockstep.
    bins = counts.clone()
    bins[:10] = 6.0
    bins[10] = 1.5
    assert codebook_metrics(state(torch.randn(100, 4), bins))["replaced_fraction"] == 0.0
    # A known reset value below 1 is used as given.
    small = counts.clone()
    small[:7] = 0.1
    st = state(torch.randn(100, 4), small, extra={"threshold_ema_dead_code": 0.1})
    m = codebook_metrics(st)
    assert m["replaced_fraction"] == pytest.approx(0.07)
    assert m["replace_threshold_to_expected"] == pytest.approx(0.1 / m["count_expected"])


def test_optimizer_rows_without_gradient():
    v = torch.rand(8, 4)
    v[[1, 4, 6]] = 0.0
    st = state(torch.randn(8, 4), kind="vq", optimizer={"exp_avg_sq": v})
    assert codebook_metrics(st)["optim_rows_no_grad_fraction"] == pytest.approx(3 / 8)
    st.optimizer = {"exp_avg_sq": v.T.contiguous()}  # [D, K] layout
    assert codebook_metrics(st)["optim_rows_no_grad_fraction"] == pytest.approx(3 / 8)


def test_usage_histogram():
    collapsed = torch.zeros(16)
    collapsed[3], collapsed[9] = 990.0, 10.0
    h = usage_histogram(state(torch.randn(16, 2), collapsed), bins=16)
    assert h[:2] == pytest.approx([0.99, 0.01]) and h[2:] == [0.0] * 14
    flat = usage_histogram(state(torch.randn(64, 2), torch.ones(64)), bins=16)
    assert flat == pytest.approx([1 / 16] * 16)
    assert usage_histogram(state(torch.randn(4, 2), torch.ones(4)), bins=16) == pytest.approx([0.25] * 4)
    assert usage_histogram(state(torch.randn(4, 2), kind="vq")) == []
    assert usage_histogram(state(torch.randn(4, 2), torch.zeros(4))) == []


def test_large_codebook_smoke():
    # 65536 x 256 must run in seconds with bounded memory (timing itself belongs in benchmarks/).
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(1, 65536, 256, generator=g)
    counts = torch.rand(1, 65536, generator=g) * 4
    m = codebook_metrics(state(cb, counts, (cb.double() * F.laplace_smooth(counts).unsqueeze(-1)).float()))
    check_names(m)
    assert m["effective_rank_fraction"] > 0.95 and m["duplicate_fraction"] == 0.0
    assert m["ema_residual_max"] < 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_property_nonfinite_anywhere_never_leaks(seed):
    # Random NaN/Inf anywhere in codebook, counts and sums: every returned value is finite,
    # the counts are exact, and the norm statistics equal those of the finite rows alone.
    g = torch.Generator().manual_seed(seed)
    st = ema_state(k=40, d=5, seed=seed)
    cb, n, m = st.codebook.clone(), st.cluster_size.clone(), st.embed_avg.clone()
    for t in (cb, n, m):
        flat = t.view(-1)
        hit = torch.randperm(flat.numel(), generator=g)[: int(torch.randint(1, 6, (1,), generator=g))]
        flat[hit] = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.arange(hit.numel()) % 3]
    got = codebook_metrics(QuantizerState("q", "vq-ema", "generic", 40, 5, codebook=cb, cluster_size=n, embed_avg=m))
    check_names(got)
    assert got["nonfinite_codebook"] == float((~torch.isfinite(cb)).sum())
    assert got["nonfinite_rows"] == float((~torch.isfinite(cb).all(-1)).sum())
    assert got["nonfinite_total"] == float((~torch.isfinite(cb)).sum() + (~torch.isfinite(n)).sum()
                                           + (~torch.isfinite(m)).sum())
    rows = torch.isfinite(cb[0]).all(-1)  # the usage-weighted median over finite rows
    w = usage_weights(n)[0]
    assert got["code_norm_median"] == pytest.approx(F.weighted_median(F.row_norms(cb[0][rows]), w[rows]))
    assert 0.0 <= got["dead_fraction"] <= 1.0 and got["perplexity"] >= 1.0


def test_replaced_fraction_with_deferred_replacement_ladder():
    """lucidrains >= 1.32 replaces at most one code per batch vector: the codes it deferred stay
    below the reset value, decaying by γ per step (2, 1.6, 1.28, ... at γ = 0.8)."""
    g = torch.Generator().manual_seed(5)
    k = 4096
    counts = torch.rand(k, generator=g) * 0.9 + 1.0  # codes hit since their reset, off the ladder
    ladder = torch.tensor(2.0, dtype=torch.float32)
    rungs = []
    for _ in range(6):
        rungs.append(ladder.clone())
        ladder = ladder.lerp(torch.tensor(0.0), 0.2)  # lucidrains ema_inplace: lerp towards 0
    pos = 0
    for share, value in zip((0.126, 0.10, 0.08, 0.06, 0.04, 0.03), rungs, strict=True):
        n = int(share * k)
        counts[pos:pos + n] = value
        pos += n
    counts[pos:pos + 200] = torch.rand(200, generator=g) * 1e-4  # deferred, far below
    m = codebook_metrics(state(torch.randn(k, 4, generator=g), counts))
    assert m["replaced_fraction"] == pytest.approx(int(0.126 * k) / k)


def test_integer_bin_sizes_are_not_resets():
    """Counts frozen at k-means bin sizes (lucidrains decay 1.0; encodec's init, times a common
    decay factor): ties at integers, a most common bin with smaller bins below it, no ladder."""
    g = torch.Generator().manual_seed(6)
    bins = torch.poisson(torch.full((1024,), 8.0), generator=g).clamp_min(1.0)
    assert codebook_metrics(state(torch.randn(1024, 4, generator=g), bins))["replaced_fraction"] == 0.0
    decayed = (bins * 0.9 ** 7).float()  # encodec: unused codes keep bin x γ^t
    assert codebook_metrics(state(torch.randn(1024, 4, generator=g), decayed))["replaced_fraction"] == 0.0
    powers = torch.tensor([8.0] * 300 + [4.0] * 50 + [2.0] * 20 + [1.0] * 10 + [7.0] * 200 + [6.0] * 150)
    assert codebook_metrics(state(torch.randn(powers.numel(), 4, generator=g), powers))["replaced_fraction"] == 0.0


def test_duplicates_among_dead_rows_are_left_to_dead_codes():
    """lucidrains dead rows shrinking towards the origin together (norms 0.02-0.2 against ~4 live,
    decay 0.9) are near each other: that is dead codes, not redundancy."""
    g = torch.Generator().manual_seed(7)
    k, d = 512, 16
    live = torch.randn(384, d, generator=g)
    dead = torch.randn(128, d, generator=g) * torch.logspace(-3, -2, 128)[:, None]
    cb = torch.cat([live, dead])
    counts = torch.cat([torch.rand(384, generator=g) + 1.0, torch.full((128,), 1e-6)])
    m = codebook_metrics(state(cb, counts))
    assert m["duplicate_fraction"] == 0.0
    # without counts the same table reads as redundant (nothing says those rows are dead)
    assert codebook_metrics(state(cb, kind="vq"))["duplicate_fraction"] > 0.1
    # a dead row sitting on a live one is redundancy: only one of them can win the argmin, and
    # the counts say which one is wasted (the dead copy is counted, its live twin is not)
    cb2 = cb.clone()
    cb2[384:] = live[:128] + 1e-6 * torch.randn(128, d, generator=g)
    assert codebook_metrics(state(cb2, counts))["duplicate_fraction"] == pytest.approx(128 / k)
    assert codebook_metrics(state(cb2, kind="vq"))["duplicate_fraction"] == pytest.approx(256 / k)


def test_no_blowup_against_a_reference_at_the_origin():
    """Encoder output exactly 0: the only live code sits at ~0 and every other row keeps its init
    norm; against a ~0 reference they would all read as blown up by 1e20."""
    g = torch.Generator().manual_seed(8)
    cb = torch.randn(256, 8, generator=g)
    cb[0] = 1e-20
    counts = torch.full((256,), 1e-9)
    counts[0] = 1024.0
    m = codebook_metrics(state(cb, counts))
    assert "blowup_rows" not in m and "blowup_ratio" not in m
    # a real zero-count blow-up (1e5 x) beside a live code at the data scale is still one
    cb2 = cb.clone()
    cb2[0] = torch.randn(8, generator=g)
    cb2[1:] *= 1e5
    m2 = codebook_metrics(state(cb2, counts))
    assert m2["blowup_rows"] == 255.0
