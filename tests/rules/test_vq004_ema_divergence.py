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
    q = qev({"blowup_rows": 40.0, "blowup_ratio": 9.9e4, "ema_lowp": 1.0})
    f = one(RULE, checkpoint(q))
    assert f.severity == "error"
    assert f.evidence["sub_causes"] == ["blowup", "lowp"]


def test_run_blowup_with_counts_warming_up_from_zero_is_an_error():
    # the user story (docs/contract.md#the-user-story): counts at 0.049 x the tokens at step 0,
    # 0.97 later; blown-up rows meanwhile
    steps = list(range(0, 300, 10))
    ratio = list(1 - 0.99 ** (np.arange(30) * 10 + 5))
    q = qev(series=frame(steps, ema_count_sum_to_tokens=ratio, blowup_ratio=[500.0] * 30, blowup_rows=[250.0] * 30))
    f = one(RULE, run(q))
    assert (f.severity, f.step) == ("error", 0)
    assert f.evidence["ema_count_sum_to_tokens_first"] < 0.05
    assert "zero-initialised counts" in f.message


def test_run_blowup_that_faded_while_codes_stay_dead():
    steps = list(range(0, 150, 10))
    q = qev(series=frame(steps, blowup_ratio=[2855.0, 261.0, 129.0] + [80.0, 40.0] + [10.0] * 10,
                         blowup_rows=[3218.0, 1606.0, 34.0] + [0.0] * 12, dead_fraction=[0.99] * 15), K=4096)
    f = one(RULE, run(q))
    assert (f.severity, f.step) == ("error", 0)
    assert f.evidence["blowup_ratio"] == 2855.0 and f.evidence["blowup_last_step"] == 20


def test_eval_passes_that_move_the_codebook_are_a_warning_and_barely_moving_ones_a_note():
    steps = list(range(0, 200, 5))
    mut = [0.0] * 39 + [4.0]
    tr = [0.01] * 40
    # evaluation data like the training data moves the table like a training batch: the model
    # still changes from evaluation data
    same = qev(series=frame(steps, eval_mutation=mut, codebook_forward_rms_change=tr,
                            eval_codebook_rms_change=[np.nan] * 39 + [0.012]))
    f = one(RULE, run(same))
    assert f.severity == "warning" and np.isclose(f.evidence["eval_move_to_train_move"], 1.2)
    # counters bumped, the table moved a tenth of a training step: a note
    barely = qev(series=frame(steps, eval_mutation=mut, codebook_forward_rms_change=tr,
                              eval_codebook_rms_change=[np.nan] * 39 + [0.001]))
    f = one(RULE, run(barely))
    assert f.severity == "info" and "barely moved" in f.message


def test_excess_count_mass_during_replacement_churn_is_left_to_churn():
    churn = qev(series=frame(ema_count_sum_to_tokens=[7.3] * 20, codes_replaced=[512.0] * 20), K=4096)
    assert check(RULE, run(churn)) == []
    quiet = qev(series=frame(ema_count_sum_to_tokens=[7.3] * 20, codes_replaced=[1.0] * 20), K=4096)
    assert one(RULE, run(quiet)).evidence["sub_causes"] == ["count_mass"]


def test_low_precision_that_already_went_non_finite_is_an_error():
    q = qev({"ema_lowp": 1.0, "nonfinite_codebook": 12.0})
    assert one(RULE, checkpoint(q)).severity == "error"


def test_low_precision_in_a_run_is_dated_from_the_first_recorded_step():
    # the dtype is recorded once (a scalar), the series starts at step 40
    q = qev({"ema_lowp": 1.0}, series=frame(range(40, 100, 10), dead_fraction=[0.0] * 6))
    assert one(RULE, run(q)).step == 40


def test_rows_divided_by_a_zero_count_name_the_missing_smoothing():
    g = gen(3)
    cb = torch.randn(32, 8, generator=g)
    z = torch.randn(256, 2, generator=g) @ torch.randn(2, 8, generator=g)  # a plane: a few codes hit
    e, n, m = ema_step(cb, z, eps=0.0)  # zero-init counts, no Laplace smoothing
    bad = ~torch.isfinite(e).all(1)
    assert 0 < int(bad.sum()) < 32 and torch.equal(bad, n == 0)
    f = one(RULE, checkpoint(measured(state(e, counts=n, sums=m))))
    assert f.severity == "error" and "no_smoothing" in f.evidence["sub_causes"]
    assert f.evidence["nonfinite_rows_zero_count"] == 1.0
    # the same step with smoothing (eps 1e-5): blown-up rows, but finite ones
    e, n, m = ema_step(cb, z, eps=1e-5)
    assert "no_smoothing" not in one(RULE, checkpoint(measured(state(e, counts=n, sums=m)))).evidence["sub_causes"]
    # NaN carried in by an input lands on the code it was assigned to, whose count is positive
    z[0] = float("nan")
    e, n, m = ema_step(cb, z, counts=torch.ones(32), sums=cb.clone())
    assert int((~torch.isfinite(e).all(1)).sum()) >= 1
    assert measured(state(e, counts=n, sums=m)).metrics["nonfinite_rows_zero_count"] == 0.0


def test_a_few_blown_rows_are_a_warning_and_one_that_faded_is_not_reported():
    # 7 of 512 rows blown up 1e5x (zero-init signature): a defect, not a broken run
    few = one(RULE, checkpoint(qev({"blowup_rows": 7.0, "blowup_ratio": 9.9e4})))
    assert few.severity == "warning" and few.evidence["sub_causes"] == ["blowup"]
    # one row blown up at step 0 that faded, while a third of the codes stay unused (healthy-imperfect)
    steps = list(range(0, 150, 5))
    ratio = [2e4] * 6 + [3.0] * 24
    rows = [1.0] * 6 + [0.0] * 24
    q = qev(series=frame(steps, blowup_ratio=ratio, blowup_rows=rows, dead_fraction=[0.35] * 30))
    assert check(RULE, run(q)) == []
    assert check(RULE, run(q), blowup_rows_share=0.0)  # without the share it would be reported


def test_zero_initialised_counts_are_safe_under_the_eps_blend_rule():
    t = np.arange(1, 51)
    ratio = 1 - 0.8 ** t  # vector-quantize-pytorch >= 1.34: counts from zero, nothing divided by ~0
    q = qev(series=frame(list(t), ema_count_sum_to_tokens=list(ratio)))
    q.ema_rule = "eps-blend"
    assert check(RULE, run(q)) == []

