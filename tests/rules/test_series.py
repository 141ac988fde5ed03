"""Run-mode helpers: onsets, sustain, spikes, growth, and one predicate for both modes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from rules_kit import frame, qev

from vqdoctor.rules import _series as S


def mask(values, steps=None) -> pd.Series:
    return pd.Series(values, index=steps if steps is not None else range(len(values)))


def test_first_sustained_returns_the_first_row_of_the_streak():
    m = mask([0, 1, 0, 1, 1, 1, 0], steps=[0, 10, 20, 30, 40, 50, 60])
    assert S.first_sustained(m, 1) == 10
    assert S.first_sustained(m, 3) == 30
    assert S.first_sustained(m, 4) is None


def test_short_series_counts_as_sustained_when_every_row_holds():
    assert S.first_sustained(mask([1, 1]), 5) == 0
    assert S.first_sustained(mask([]), 3) is None


def test_onset_requires_the_condition_to_hold_at_the_end():
    m = mask([0, 1, 1, 1, 0])
    assert S.onset(m, 3) is None
    assert S.onset(m, 3, at_end=False) == 1


def test_column_drops_unmeasured_rows_but_can_keep_them():
    df = frame(loss=[1.0, math.nan, math.inf, 2.0])
    assert list(S.column(df, "loss").index) == [0, 3]
    assert len(S.column(df, "loss", finite=False)) == 4
    assert S.column(df, "absent") is None and S.column(None, "loss") is None


def test_spikes_against_the_median_of_previous_rows():
    g = pd.Series([1.0] * 30 + [150.0] + [1.0] * 5)
    assert list(np.flatnonzero(S.spikes(g, 100.0, 20))) == [30]


def test_ratio_to_running_min_and_growth():
    s = pd.Series([4.0, 2.0, 8.0, 16.0])
    assert list(S.ratio_to_running_min(s)) == [1.0, 1.0, 4.0, 8.0]
    assert S.growth(s, 2).iloc[-1] == 8.0  # 16 / min(2, 8, 16)


def test_log_slope_is_the_exponential_rate():
    steps = np.arange(0, 100, 5)
    s = pd.Series(3.0 * np.exp(0.07 * steps), index=steps)
    assert math.isclose(S.log_slope(s), 0.07, rel_tol=1e-9)
    assert math.isnan(S.log_slope(pd.Series([1.0])))


def test_judge_in_run_and_checkpoint_mode():
    run_q = qev(series=frame([0, 10, 20, 30], dead_fraction=[0.1, 0.6, 0.7, 0.65]))
    hit = S.judge(run_q, "dead_fraction", lambda v: v >= 0.5, 2)
    assert (hit.step, hit.last, hit.worst, hit.rows) == (10, 0.65, 0.7, 3)
    ckpt_q = qev({"dead_fraction": 0.6})
    assert S.judge(ckpt_q, "dead_fraction", lambda v: v >= 0.5) == S.Hit(None, 0.6, 0.6)
    assert S.judge(ckpt_q, "perplexity", lambda v: v >= 0) is None
    assert S.latest(run_q, "dead_fraction") == 0.65 and S.latest(ckpt_q, "dead_fraction") == 0.6


def test_episodes_and_a_transient_that_ended():
    m = mask([0, 1, 1, 1, 1, 0, 0, 1, 0], steps=[0, 10, 20, 30, 40, 50, 60, 70, 80])
    eps = S.episodes(m, 2)
    assert [(e.start, e.end, e.rows, e.ended, e.steps) for e in eps] == [(10, 40, 4, 50, 40)]
    assert S.transient(m, 2, 40) == eps[0]
    assert S.transient(m, 2, 41) is None  # not long enough
    assert S.transient(mask([0, 1, 1, 1]), 2, 0) is None  # still holding: `onset` applies


def test_damage_at_end_reads_dead_codes_or_collapse():
    dead = qev(series=frame(dead_fraction=[0.1, 0.9]), K=512)
    assert S.damage_at_end(dead) == {"dead_fraction_end": 0.9}
    collapsed = qev(series=frame(perplexity=[300.0] + [3.0] * 10, tokens=[1024.0] * 11), K=512)
    assert S.damage_at_end(collapsed)["perplexity_fraction_end"] == 3.0 / 512
    healthy = qev(series=frame(dead_fraction=[0.9, 0.05], perplexity=[3.0, 300.0], tokens=[1024.0] * 2), K=512)
    assert S.damage_at_end(healthy) is None
