"""VQ008 frozen-codebook: drift across checkpoints, optimizer state, per-step RMS change."""

from __future__ import annotations

import torch
from rules_kit import check, checkpoint, frame, gen, measured, one, qev, run, state

from vqdoctor.metrics.drift import drift_metrics

RULE = "frozen-codebook"


def drifted(first, last):
    """Evidence for the last of two checkpoints, with vqdoctor's drift metrics."""
    return checkpoint(measured(last, **drift_metrics([first, last])))


def test_bit_identical_ema_codebook_and_counts_across_checkpoints():
    cb, counts = torch.randn(64, 8, generator=gen(0)), torch.rand(64, generator=gen(1)) * 10
    a, b = state(cb, counts=counts), state(cb.clone(), counts=counts.clone())
    f = one(RULE, drifted(a, b))
    assert (f.id, f.severity, f.confidence) == ("frozen-codebook", "error", 0.9)
    assert f.evidence["codebook_frozen"] == 1.0 and f.evidence["counts_frozen"] == 1.0
    assert "decay below 1" in f.fix


def test_moving_codebook_is_silent_and_near_resolution():
    cb = torch.randn(64, 8, generator=gen(2))
    moved = state(cb + 1e-3 * torch.randn(64, 8, generator=gen(3)), kind="vq")
    assert check(RULE, drifted(state(cb, kind="vq"), moved)) == []
    # a change below float32 resolution relative to the codebook counts as none
    q = qev({"codebook_frozen": 0.0, "codebook_rel_change": 5e-8, "drift_checkpoints": 2.0}, kind="vq")
    assert one(RULE, checkpoint(q)).confidence == 0.8
    q = qev({"codebook_frozen": 0.0, "codebook_rel_change": 2e-7, "drift_checkpoints": 2.0}, kind="vq")
    assert check(RULE, checkpoint(q)) == []


def test_optimizer_never_saw_a_gradient():
    K, D = 128, 8
    s = state(torch.randn(K, D, generator=gen(4)), kind="vq",
              optimizer={"exp_avg_sq": torch.zeros(K, D)})
    f = one(RULE, checkpoint(measured(s)))
    assert f.evidence["optim_rows_no_grad_fraction"] == 1.0
    assert "codebook loss" in f.fix
    s.optimizer["exp_avg_sq"][0, 0] = 1e-8  # one row got a gradient once
    assert check(RULE, checkpoint(measured(s))) == []


def test_simvq_frozen_base_is_by_design():
    assert check(RULE, checkpoint(qev({"codebook_frozen": 1.0}, kind="simvq"))) == []


def test_run_no_change_and_no_gradient():
    steps = range(0, 600, 10)
    rms = [0.01] * 30 + [0.0] * 30  # frozen from step 300
    q = qev(series=frame(steps, codebook_rms_change=rms, code_norm_median=[1.0] * 60,
                         grad_norm_codebook=[0.0] * 60), kind="vq")
    f = one(RULE, run(q))
    assert (f.step, f.severity) == (300, "error")
    assert f.evidence["grad_norm_codebook"] == 0.0
    assert "receives no gradient" in f.fix


def test_run_gradient_but_no_update_names_the_optimizer():
    q = qev(series=frame(codebook_rms_change=[0.0] * 25, grad_norm_codebook=[0.3] * 25), kind="vq")
    assert "param groups" in one(RULE, run(q)).fix


def test_run_gradient_accumulation_is_not_frozen():
    rms = ([0.0] * 7 + [0.02]) * 10  # the codebook steps every 8th row
    assert check(RULE, run(qev(series=frame(codebook_rms_change=rms), kind="vq"))) == []


def test_run_short_freeze_below_window():
    rms = [0.01] * 10 + [0.0] * 19  # frozen_window = 20
    assert check(RULE, run(qev(series=frame(codebook_rms_change=rms)))) == []
    assert len(check(RULE, run(qev(series=frame(codebook_rms_change=rms + [0.0]))))) == 1
