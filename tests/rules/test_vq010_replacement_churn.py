"""VQ010 replacement-churn: resets per step relative to K, threshold vs n/K, ineffective replacement."""

from __future__ import annotations

import math

import torch
from rules_kit import check, checkpoint, frame, gen, measured, one, qev, run, state

RULE = "replacement-churn"
K = 512


def lucidrains_counts(tokens_per_code: int, steps: int = 30, threshold: float = 2.0,
                      decay: float = 0.8) -> torch.Tensor:
    """EMA counts under lucidrains-style replacement: codes below threshold reset to it exactly."""
    g = gen(0)
    counts = torch.ones(K)
    for _ in range(steps):
        idx = torch.randint(0, K, (tokens_per_code * K,), generator=g)
        counts = decay * counts + (1 - decay) * torch.bincount(idx, minlength=K).float()
        counts = torch.where(counts < threshold, torch.full_like(counts, threshold), counts)
    return counts


def measured_counts(counts: torch.Tensor):
    s = state(torch.randn(K, 8, generator=gen(1)), counts=counts,
              extra={"threshold_ema_dead_code": 2.0})
    return checkpoint(measured(s))


def test_churn_when_threshold_exceeds_tokens_per_code():
    counts = lucidrains_counts(tokens_per_code=1)  # n/K = 1, threshold 2
    reset = int((counts == 2.0).sum())
    f = one(RULE, measured_counts(counts))
    assert (f.id, f.severity) == ("replacement-churn", "error")
    assert f.evidence["replaced_fraction"] == reset / K
    assert math.isclose(f.evidence["count_expected"], float(counts.sum()) / K, rel_tol=1e-6)
    assert "0.1-0.5 x n/K" in f.fix


def test_no_churn_with_many_tokens_per_code():
    counts = lucidrains_counts(tokens_per_code=32)
    assert int((counts == 2.0).sum()) == 0
    assert check(RULE, measured_counts(counts)) == []


def test_near_churn_warn():
    assert check(RULE, checkpoint(qev({"replaced_fraction": 0.049}, K=K))) == []
    assert one(RULE, checkpoint(qev({"replaced_fraction": 0.05}, K=K))).severity == "warning"


def test_threshold_above_expected_count_alone_warns():
    f = one(RULE, checkpoint(qev({"replace_threshold_to_expected": 2.0, "count_expected": 1.0})))
    assert (f.severity, f.confidence) == ("warning", 0.5)


def test_run_churn_rate_over_window():
    rep = [0] * 20 + [150] * 40  # 29% of K per step from step 20
    f = one(RULE, run(qev(series=frame(codes_replaced=rep), K=K)))
    assert f.severity == "error"
    # mean over the last 20 rows: 4 x 150 / 20 / 512 = 5.9% >= 5% first at step 23 (3 rows: 4.4%)
    assert f.step == 23
    assert f.evidence["replaced_per_step_fraction"] == 150 / K


def test_run_low_replacement_rate_is_silent():
    rep = [10] * 60  # 2% of K per step, usage improving
    dead = [0.5 - 0.005 * i for i in range(60)]
    assert check(RULE, run(qev(series=frame(codes_replaced=rep, dead_fraction=dead), K=K))) == []


def test_run_ineffective_replacement_encodec_61():
    steps = range(0, 600, 10)
    rep = [5] * 60  # codes "replaced" every step...
    dead = [0.62] * 60  # ...and exactly as many dead as before
    f = one(RULE, run(qev(series=frame(steps, codes_replaced=rep, dead_fraction=dead), K=K)))
    assert (f.severity, f.step) == ("info", 200)  # first row with a full window behind it
    assert "embed_avg and cluster_size" in f.fix
    # most of the codebook left dead: the level where dead codes are a warning (VQ005)
    f = one(RULE, run(qev(series=frame(steps, codes_replaced=rep, dead_fraction=[0.85] * 60), K=K)))
    assert f.severity == "warning"
