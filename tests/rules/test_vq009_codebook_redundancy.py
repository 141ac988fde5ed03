"""VQ009 codebook-redundancy: duplicate rows (zero rows excluded) and low effective rank."""

from __future__ import annotations

import math

import torch
from rules_kit import check, checkpoint, frame, gen, measured, one, qev, run, state

RULE = "codebook-redundancy"
K, D = 512, 32


def with_copies(pairs: int, seed: int = 0) -> torch.Tensor:
    cb = torch.randn(K, D, generator=gen(seed))
    cb[pairs:2 * pairs] = cb[:pairs]  # replacement that sampled the same vector twice
    return cb


def test_duplicates_fire_and_near_threshold():
    assert check(RULE, checkpoint(measured(state(with_copies(12), kind="vq")))) == []  # 24/512
    f = one(RULE, checkpoint(measured(state(with_copies(14), kind="vq"))))  # 28/512
    assert (f.id, f.severity) == ("codebook-redundancy", "warning")
    assert math.isclose(f.evidence["duplicate_fraction_net"], 28 / K)


def test_many_duplicates_are_an_error():
    f = one(RULE, checkpoint(measured(state(with_copies(100), kind="vq"))))
    assert f.severity == "error"
    assert math.isclose(f.evidence["duplicate_fraction_net"], 200 / K)


def test_rows_collapsed_to_zero_are_left_to_dead_codes():
    cb = torch.randn(K, D, generator=gen(1))
    cb[:200] = 0.0  # dead EMA codes drifted to the origin: duplicates of each other
    m = measured(state(cb, kind="vq"))
    assert m.metrics["zero_rows"] == 200
    # the metric measures spacing at the working scale: rows at ~0 are dead codes, not duplicates
    assert m.metrics["duplicate_fraction"] == 0.0
    assert check(RULE, checkpoint(m)) == []


def test_dimensional_collapse_of_a_rank_4_codebook():
    g = gen(2)
    cb = torch.randn(K, 4, generator=g) @ torch.randn(4, 256, generator=g)
    f = one(RULE, checkpoint(measured(state(cb, kind="vq"))))
    assert (f.severity, f.confidence) == ("warning", 0.5)
    assert f.evidence["effective_rank"] <= 4.0
    assert f.evidence["effective_rank_fraction"] <= 0.05


def test_random_codebook_is_silent():
    assert check(RULE, checkpoint(measured(state(torch.randn(K, D, generator=gen(3)), kind="vq")))) == []


def test_fsq_is_skipped():
    assert check(RULE, checkpoint(qev({"duplicate_fraction": 0.9}, kind="fsq"))) == []


def test_run_duplicates_onset_net_of_zero_rows():
    steps = range(0, 200, 10)
    dup = [0.01] * 10 + [0.4] * 10
    zero = [0.0] * 10 + [0.05] * 10
    f = one(RULE, run(qev(series=frame(steps, duplicate_fraction=dup, zero_row_fraction=zero))))
    assert (f.step, f.severity) == (100, "error")
    assert math.isclose(f.evidence["duplicate_fraction_net"], 0.35)


def test_decaying_dead_rows_are_not_duplicates_when_counts_exist():
    """lucidrains dead rows still shrinking towards the origin (norms 0.02-0.2 against ~4 live at
    decay 0.9) sit close to each other but above the ~0 cut-off: with EMA counts they are dead
    codes, not redundant ones."""
    g = gen(21)
    live = torch.randn(384, 16, generator=g)
    dead = torch.randn(128, 16, generator=g) / 16 * torch.linspace(0.02, 0.2, 128)[:, None] / 0.25
    counts = torch.cat([torch.rand(384, generator=g) + 1.0, torch.full((128,), 1e-7)])
    cb = torch.cat([live, dead])
    assert check(RULE, checkpoint(measured(state(cb, counts=counts)))) == []
