"""VQ004 ema-divergence: zero-init blow-ups, broken invariant, low precision, eval mutation, count mass."""

from __future__ import annotations

import numpy as np
import torch
from rules_kit import (
    assign,
    check,
    checkpoint,
    ema_step,
    frame,
    gen,
    measured,
    one,
    qev,
    run,
    state,
)

RULE = "ema-divergence"
K, D = 512, 64


def healthy(seed: int = 0):
    """One EMA step from counts initialised to ones (lucidrains >= 1.15.3): no blow-ups."""
    g = gen(seed)
    cb, z = torch.randn(K, D, generator=g), torch.randn(4096, D, generator=g)
    return ema_step(cb, z, counts=torch.ones(K), sums=cb.clone())


def test_zero_initialised_counts_blow_up_unused_rows():
    g = gen(1)
    cb, z = torch.randn(K, D, generator=g), torch.randn(4096, D, generator=g)
    unused = int((torch.bincount(assign(z, cb), minlength=K) == 0).sum())
    e, n, m = ema_step(cb, z)  # rosinality / zalando / taming: counts start at 0, no debiasing
    f = one(RULE, checkpoint(measured(state(e, counts=n, sums=m))))
    assert (f.id, f.severity) == ("ema-divergence", "error")
    assert f.evidence["sub_causes"][0] == "blowup"
    assert f.evidence["blowup_rows"] == unused
    assert f.evidence["blowup_ratio"] >= 1e3
    assert "cluster_size to ones" in f.fix


def test_healthy_ema_is_silent():
    e, n, m = healthy()
    assert check(RULE, checkpoint(measured(state(e, counts=n, sums=m)))) == []


def test_not_applied_to_gradient_codebooks():
    q = qev({"blowup_rows": 10.0, "blowup_ratio": 1e5}, kind="vq")
    assert check(RULE, checkpoint(q)) == []


def test_invariant_near_threshold():
    e, n, m = healthy(2)
    below = check(RULE, checkpoint(measured(state(e * 1.005, counts=n, sums=m))))
    f = one(RULE, checkpoint(measured(state(e * 1.02, counts=n, sums=m))))
    assert below == []
    assert f.severity == "warning"
    assert np.isclose(f.evidence["ema_residual_max"], 0.02 / 1.02, rtol=1e-3)
    assert f.evidence["ema_residual_median"] >= 0.01  # every row: systematic (gradient on EMA)
    assert "gradient" in f.fix


def test_rows_overwritten_without_resetting_statistics():
    e, n, m = healthy(3)
    e = e.clone()
    e[:5] = torch.randn(5, D, generator=gen(4))  # encodec-style replacement, stats untouched
    f = one(RULE, checkpoint(measured(state(e, counts=n, sums=m))))
    assert f.evidence["sub_causes"] == ["invariant"]
    assert f.evidence["ema_residual_median"] < 0.01
    assert "espnet" in f.fix


def test_low_precision_buffers():
    e, n, m = healthy(5)
    s = state(e, counts=n, sums=m, dtypes={"cluster_size": "bfloat16", "embed_avg": "bfloat16"})
    f = one(RULE, checkpoint(measured(s)))
    assert (f.severity, f.evidence["sub_causes"]) == ("warning", ["lowp"])


def test_eval_mutation_event_in_a_run():
    mut = [0] * 12 + [3] + [0] * 7
    f = one(RULE, run(qev(series=frame(range(0, 200, 10), eval_mutation=mut))))
    assert (f.severity, f.step) == ("warning", 120)
    assert f.evidence["eval_mutation_steps"] == 1


def test_count_mass_of_zero_initialised_counts_warming_up():
    t = np.arange(1, 51)
    ratio = 1 - 0.99 ** t  # sum of counts = n (1 - decay^t) without debiasing
    f = one(RULE, run(qev(series=frame(list(t), ema_count_sum_to_tokens=list(ratio)))))
    assert f.evidence["sub_causes"] == ["count_mass"]
    assert f.step == 1
    assert "debias" in f.fix


def test_count_mass_matches_world_size_or_replacement_is_silent():
    all_reduced = qev(series=frame(ema_count_sum_to_tokens=[4.0] * 20))
    assert check(RULE, run(all_reduced, world_size=4)) == []
    with_replacement = qev(series=frame(ema_count_sum_to_tokens=[1.36] * 20))  # toy: 2787/2048
    assert check(RULE, run(with_replacement)) == []
    assert len(check(RULE, run(all_reduced))) == 1  # 4x tokens on one rank is not consistent


def test_several_sub_causes_in_one_finding_worst_first():
    q = qev({"blowup_rows": 7.0, "blowup_ratio": 9.9e4, "ema_lowp": 1.0})
    f = one(RULE, checkpoint(q))
    assert f.severity == "error"
    assert f.evidence["sub_causes"] == ["blowup", "lowp"]
