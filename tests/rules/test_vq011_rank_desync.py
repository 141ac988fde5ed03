"""VQ011 rank-desync: per-rank codebooks compared relative to the median code norm."""

from __future__ import annotations

import torch
from rules_kit import check, checkpoint, frame, gen, measured, one, qev, run, state

from vqdoctor.metrics.drift import rank_difference

RULE = "rank-desync"


def ranks(offset: float) -> list:
    """Rank 0 and rank 1 codebooks; rank 1 has one code moved by `offset` x its norm."""
    cb = torch.randn(256, 16, generator=gen(0))
    other = cb.clone()
    other[7] += offset * cb[7]
    return [state(cb), state(other)]


def evidence(offset: float):
    states = ranks(offset)
    return checkpoint(measured(states[0], **rank_difference(states)))


def test_identical_ranks_are_silent():
    assert check(RULE, evidence(0.0)) == []


def test_near_warn_diff():
    assert check(RULE, evidence(0.5e-4)) == []
    f = one(RULE, evidence(1e-3))
    assert (f.id, f.severity, f.confidence) == ("rank-desync", "warning", 0.7)


def test_visible_difference_is_an_error():
    f = one(RULE, evidence(0.5))
    cb = ranks(0.5)[0].codebook[0]
    expected = float(0.5 * cb[7].norm() / cb.norm(dim=1).median())
    assert f.severity == "error"
    assert abs(f.evidence["rank_codebook_max_diff"] - expected) < 1e-5


def test_run_onset_and_worst_value():
    steps = range(0, 300, 10)
    diff = [0.0] * 10 + [0.02] * 5 + [0.001] * 15
    f = one(RULE, run(qev(series=frame(steps, rank_codebook_max_diff=diff)), world_size=4))
    assert (f.step, f.severity) == (100, "error")
    assert f.evidence["rank_codebook_max_diff"] == 0.02
    assert f.evidence["world_size"] == 4
