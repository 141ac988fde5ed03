"""Run-mode helpers shared by the rules: per-step series -> onsets, spikes and growth.

A run's per-quantizer `series` and its run-wide `run_series` are DataFrames indexed by training
step, one column per metric name (`vqdoctor.metrics.names`). Rows are *recorded* steps (a
recorder may flush every N training steps, and some metrics are measured less often), so every
window and sustain length here counts recorded rows, not training steps. Rows where a metric
was not measured (NaN) are dropped per column before any judgement: a gap is not a value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vqdoctor.rules.base import QuantizerEvidence

if TYPE_CHECKING:  # imported inside the functions that need it (see rules/base.py)
    import pandas as pd


def column(df: pd.DataFrame | None, name: str, *, finite: bool = True) -> pd.Series | None:
    """One metric as a float series sorted by step.

    Args:
        df: a series frame (may be None: checkpoint mode).
        name: metric name.
        finite: drop NaN and +-Inf rows (default); when False only the frame's own order and
            float conversion are applied, so non-finite values can be inspected.

    Returns:
        The series, or None when the column is absent or holds no usable row.
    """
    if df is None or name not in df.columns:
        return None
    import pandas as pd

    s = pd.to_numeric(df[name], errors="coerce").astype(float).sort_index()
    if finite:
        s = s[np.isfinite(s.to_numpy())]
    return s if len(s) else None


def qcol(q: QuantizerEvidence, name: str) -> pd.Series | None:
    """`column(q.series, name)`: a quantizer's finite per-step values of one metric."""
    return column(q.series, name)


def frame(df: pd.DataFrame | None, names: list[str]) -> pd.DataFrame | None:
    """The named columns on the rows where all of them were measured (finite); None if any is absent."""
    cols = [column(df, n) for n in names]
    if any(c is None for c in cols):
        return None
    import pandas as pd

    out = pd.concat(cols, axis=1, keys=names, join="inner").sort_index()
    return out if len(out) else None


def step_of(label: object) -> int | None:
    """A step index label as a plain int (None when it is not a number)."""
    try:
        return int(label)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def first_sustained(mask: pd.Series, k: int = 1) -> int | None:
    """Step at which `mask` first holds for `k` consecutive recorded rows.

    The onset is the *first* row of that streak (the early warning), not the row where the streak
    reached length k. A series shorter than k counts as sustained when every row holds.

    Args:
        mask: boolean series indexed by step (NaN counts as False).
        k: rows the condition must hold in a row (noise protection).

    Returns:
        The onset step, or None when the condition never held long enough.
    """
    m = mask.fillna(False).astype(bool).to_numpy()
    if not len(m):
        return None
    k = max(1, min(int(k), len(m)))
    streak = 0
    for i, v in enumerate(m):
        streak = streak + 1 if v else 0
        if streak >= k:
            return step_of(mask.index[i - k + 1])
    return None


def holds_at_end(mask: pd.Series) -> bool:
    """True when the condition holds on the latest recorded row."""
    return bool(len(mask)) and bool(mask.fillna(False).astype(bool).iloc[-1])


def onset(mask: pd.Series, k: int, *, at_end: bool = True) -> int | None:
    """`first_sustained(mask, k)`, and (when `at_end`) only if the condition still holds now.

    State-like conditions (dead codes, collapse, scale) are reported while they last; a
    transient that resolved itself is not a finding.
    """
    start = first_sustained(mask, k)
    if start is None or (at_end and not holds_at_end(mask)):
        return None
    return start


@dataclass(frozen=True)
class Episode:
    """A streak of recorded rows on which a condition held.

    Attributes:
        start: step of its first row (the onset).
        end: step of its last row.
        rows: recorded rows in the streak.
        ended: step of the first row after it on which the condition no longer held (None
            while it still holds on the latest row).
    """

    start: int
    end: int
    rows: int
    ended: int | None

    @property
    def steps(self) -> int:
        """Training steps it lasted: to the row that ended it (to its last row while ongoing)."""
        return (self.ended if self.ended is not None else self.end) - self.start


def episodes(mask: pd.Series, k: int = 1) -> list[Episode]:
    """Every streak of at least `k` consecutive recorded rows on which `mask` holds, in order."""
    m = mask.fillna(False).astype(bool).to_numpy()
    idx = [step_of(i) for i in mask.index]
    out: list[Episode] = []
    i, n = 0, len(m)
    while i < n:
        if not m[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and m[j + 1]:
            j += 1
        if j - i + 1 >= max(1, k) and idx[i] is not None and idx[j] is not None:
            out.append(Episode(start=int(idx[i]), end=int(idx[j]), rows=j - i + 1,
                               ended=idx[j + 1] if j + 1 < n else None))
        i = j + 1
    return out


def transient(mask: pd.Series, k: int, min_steps: int) -> Episode | None:
    """The first streak of >= `k` rows lasting >= `min_steps` steps that has *ended*.

    For state-like conditions that came and went (a scale drift that healed, a wrong-scale
    init the encoder grew out of): what they did may outlast them (`damage_at_end`), so a rule
    reports them with their onset and end instead of forgetting them. None while the
    condition still holds at the end (then `onset` applies) or when no streak was long enough.
    """
    if holds_at_end(mask):
        return None
    for e in episodes(mask, k):
        if e.ended is not None and e.steps >= min_steps:
            return e
    return None


def damage_at_end(q: QuantizerEvidence, *, dead_fraction: float = 0.25,
                  perplexity_fraction: float = 0.05) -> dict[str, float] | None:
    """The lasting symptoms a past condition may have caused, when they are present now.

    Dead codes (`dead_fraction`, else 1 - `usage_window`, latest) >= `dead_fraction`, or a
    collapsed usage (latest batch `perplexity` / min(K, `tokens`) <= `perplexity_fraction`).
    The defaults are VQ005's and VQ006's warning levels.

    Returns:
        The symptom values (evidence), or None when the run ends without them.
    """
    out: dict[str, float] = {}
    dead = latest(q, "dead_fraction")
    if dead is None and (u := latest(q, "usage_window")) is not None:
        dead = 1.0 - u
    if dead is not None and dead >= dead_fraction:
        out["dead_fraction_end"] = dead
    ps = qcol(q, "perplexity")
    perp = float(ps.iloc[-10:].median()) if ps is not None else q.m("perplexity")  # batch value: a few rows
    if perp is not None and q.codebook_size:
        n = latest(q, "tokens") or q.codebook_size
        frac = perp / max(1.0, min(q.codebook_size, n))
        if frac <= perplexity_fraction:
            out["perplexity_end"] = perp
            out["perplexity_fraction_end"] = frac
    return out or None


def after(s: pd.Series, step: int | None) -> pd.Series:
    """Rows of `s` at or after `step` (all rows when step is None)."""
    return s if step is None else s[s.index >= step]


def at(s: pd.Series, step: int | None) -> float:
    """Value of `s` at `step` (its last value when step is None)."""
    return float(s.iloc[-1] if step is None else s.loc[step])


def prior_median(s: pd.Series, window: int) -> pd.Series:
    """Median of the `window` rows *before* each row (NaN until half a window has been seen)."""
    return s.rolling(window, min_periods=max(1, window // 2)).median().shift(1)


def spikes(s: pd.Series, factor: float, window: int) -> pd.Series:
    """Rows where `s` is at least `factor` times the median of the preceding `window` rows."""
    base = prior_median(s, window)
    return (base > 0) & (s >= factor * base)


def ratio_to_running_min(s: pd.Series) -> pd.Series:
    """`s / (smallest positive value seen so far)`; NaN before the first positive value.

    Only meaningful for positive quantities (losses, norms); non-positive rows do not move the
    running minimum.
    """
    running = s.where(s > 0).cummin().ffill()
    return s / running


def growth(s: pd.Series, window: int) -> pd.Series:
    """`s / min(s over the previous `window` rows and this one)`: growth within a window.

    A value >= 2 means the quantity at least doubled within `window` recorded rows. A linear
    ramp (e.g. a loss-weight warm-up) quickly stops doubling per window; exponential growth
    keeps doing so.
    """
    base = s.where(s > 0).rolling(window + 1, min_periods=2).min()
    return s / base


def log_slope(s: pd.Series) -> float:
    """Least-squares slope of ln(s) per step (the exponential growth rate); NaN if undefined."""
    s = s[s > 0]
    if len(s) < 2:
        return float("nan")
    x = np.asarray(s.index, dtype=float)
    y = np.log(s.to_numpy(dtype=float))
    if np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def where(df: pd.DataFrame | None, names: list[str],
          fn: Callable[..., pd.Series]) -> pd.Series | None:
    """Boolean series `fn(col_a, col_b, ...)` over the rows where all `names` were measured."""
    f = frame(df, names)
    if f is None:
        return None
    return fn(*(f[n] for n in names)).astype(bool)


@dataclass(frozen=True)
class Hit:
    """A condition found on one metric.

    Attributes:
        step: onset step (run mode), None for a checkpoint scalar.
        last: latest value (the scalar itself for a checkpoint).
        worst: largest value from the onset on (the scalar for a checkpoint).
        rows: recorded rows on which the condition held (1 for a checkpoint).
    """

    step: int | None
    last: float
    worst: float
    rows: int = 1


def judge(q: QuantizerEvidence, name: str, pred: Callable[[Any], Any], k: int = 1, *,
          at_end: bool = True) -> Hit | None:
    """Apply `pred` to a metric in either mode: the run series when recorded, else the scalar.

    Args:
        q: the quantizer.
        name: metric name.
        pred: condition, written so it works on a float and on a Series (`lambda v: v > 0`).
        k: sustain length in recorded rows (run mode).
        at_end: state-like condition that must still hold on the latest row (run mode);
            False for events (the first occurrence is enough).

    Returns:
        A Hit, or None when the condition does not hold or the metric was not measured.
    """
    s = qcol(q, name)
    if s is not None:
        mask = pred(s).astype(bool)
        start = onset(mask, k, at_end=at_end)
        if start is None:
            return None
        return Hit(step=start, last=float(s.iloc[-1]), worst=float(after(s, start).max()),
                   rows=int(mask.sum()))
    v = q.m(name)
    if v is None or not bool(pred(v)):
        return None
    return Hit(step=None, last=v, worst=v)


def latest(q: QuantizerEvidence, name: str, default: float | None = None) -> float | None:
    """Latest value of a metric: last finite row of the run series, else the scalar metric."""
    s = qcol(q, name)
    return float(s.iloc[-1]) if s is not None else q.m(name, default)
