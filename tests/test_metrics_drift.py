"""Drift across checkpoints and differences across ranks, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vqdoctor.metrics import functional as F
from vqdoctor.metrics.drift import drift_metrics, rank_difference
from vqdoctor.metrics.names import DRIFT
from vqdoctor.quantizers.base import QuantizerState


def st(codebook=None, counts=None) -> QuantizerState:
    cb = None if codebook is None else F.as_hkd(codebook)
    return QuantizerState("q", "vq-ema", "generic", 4, 2, codebook=cb,
                          cluster_size=None if counts is None else F.as_hk(counts))


def test_moving_codebook_by_hand():
    first = torch.ones(4, 2)
    m = drift_metrics([st(first), st(first + 0.25), st(first + 0.5)])
    assert set(m) <= set(DRIFT)
    assert m["drift_checkpoints"] == 3.0
    assert m["codebook_rms_change"] == pytest.approx(0.5)
    assert m["codebook_rel_change"] == pytest.approx(0.5)  # |0.5 * 1|_F / |1|_F
    assert m["codebook_frozen"] == 0.0


def test_frozen_codebook_and_counts_are_bit_identical_even_with_nan():
    cb = torch.randn(4, 2)
    cb[1, 1] = float("nan")
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    m = drift_metrics([st(cb.clone(), counts.clone()), st(cb.clone(), counts.clone())])
    assert m["codebook_frozen"] == 1.0 and m["counts_frozen"] == 1.0
    assert m["codebook_rms_change"] == 0.0
    moved = cb.clone()
    moved[0, 0] = torch.nextafter(moved[0, 0], torch.tensor(math.inf))  # one ulp is a change
    assert drift_metrics([st(cb), st(moved)])["codebook_frozen"] == 0.0


def test_dead_fraction_growth():
    early = torch.tensor([4.0, 4.0, 4.0, 4.0])
    late = torch.tensor([8.0, 8.0, 0.0, 0.0])
    m = drift_metrics([st(torch.randn(4, 2), early), st(torch.randn(4, 2), late)])
    assert m["dead_fraction_first"] == 0.0 and m["dead_fraction_delta"] == 0.5
    assert m["counts_frozen"] == 0.0


def test_single_checkpoint_and_mismatched_shapes():
    assert drift_metrics([st(torch.randn(4, 2))]) == {"drift_checkpoints": 1.0}
    m = drift_metrics([st(torch.randn(4, 2)), st(torch.randn(5, 2))])
    assert "codebook_rms_change" not in m


def test_all_zero_first_codebook_has_no_relative_change():
    m = drift_metrics([st(torch.zeros(4, 2)), st(torch.ones(4, 2))])
    assert m["codebook_rms_change"] == 1.0 and "codebook_rel_change" not in m


def test_rank_difference_by_hand():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])  # every norm 1
    assert rank_difference([st(cb), st(cb.clone())]) == {"rank_codebook_max_diff": 0.0}
    other = cb.clone()
    other[2] += torch.tensor([0.0, 2.0])
    assert rank_difference([st(cb), st(cb.clone()), st(other)])["rank_codebook_max_diff"] == pytest.approx(2.0)
    assert rank_difference([st(cb)]) == {}


def test_rows_unchanged_between_checkpoints():
    g = torch.Generator().manual_seed(4)
    first = torch.randn(100, 8, generator=g) * 1e-3  # a tiny init scale
    last = first.clone()
    last[:10] += torch.randn(10, 8, generator=g)  # ten codes in use moved to the data scale
    m = drift_metrics([st(first), st(last)])
    assert m["rows_unchanged_fraction"] == pytest.approx(0.9)
    assert m["moved_rows_norm_ratio"] > 100
    assert set(m) <= set(DRIFT)
    # every row moved (healthy) or none (frozen): no ratio, fraction 0 / 1
    assert drift_metrics([st(first), st(first + 1e-3)])["rows_unchanged_fraction"] == 0.0
    frozen = drift_metrics([st(first), st(first.clone())])
    assert frozen["rows_unchanged_fraction"] == 1.0 and "moved_rows_norm_ratio" not in frozen
    # non-finite rows are left out of both sides
    nan_last = last.clone()
    nan_last[50] = float("nan")
    assert drift_metrics([st(first), st(nan_last)])["rows_unchanged_fraction"] == pytest.approx(89 / 99)
