"""The run source: a run directory's records (every rank) -> the rules' evidence.

Ranks are aggregated here: per-step values are averaged over ranks (counts of tokens and of
non-finite elements or eval mutations are summed), and the windowed usage metrics are
recomputed from the `hist` records summed over ranks, so global usage is exact (the same
figure a single process would report on the same data). With one rank the windowed metrics of
the step records are used as recorded (exact per step).

Windows that have not yet seen `constants.MIN_HITS_PER_CODE` x K vectors say nothing about which
codes are dead: their hit-based metrics (`usage_window`, `usage_fraction`, `dead_fraction`) are
gaps in the evidence, not values (the run store keeps them as recorded).

With `window=N` the latest windowed usage is recomputed over the last N steps from the `hist`
records (what `vqdoctor gate --window N` judges); the steps it could cover are in
`source["window"]`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from vqdoctor.live.store import FP_BLOCKS, records_frame
from vqdoctor.metrics import usage as U
from vqdoctor.metrics.constants import MIN_HITS_PER_CODE
from vqdoctor.results.model import QuantizerReport, QuantizerSeries, ReportSeries
from vqdoctor.results.series import (
    CHART_METRICS,
    RUN_METRICS,
    head_usage_from_counts,
    rank_frequency,
    step_table,
    thin,
)
from vqdoctor.rules.base import Evidence, QuantizerEvidence
from vqdoctor.sources import Observation

# per-step values that are totals over ranks; every other column is averaged
SUM_OVER_RANKS = {"tokens", "nonfinite_input", "nonfinite_output", "nonfinite_buffers", "nonfinite_grad",
                  "eval_mutation"}
# per-step batch metrics: their "latest" value is the mean over the last flush interval, not one noisy step
BATCH = {"tokens", "perplexity", "perplexity_fraction", "entropy_norm", "top1_share"}
WINDOWED = U.WINDOW_NAMES
HIT_BASED = U.HIT_BASED


def _quantizer_infos(meta: dict[str, Any], streams: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    qs = meta.get("quantizers")
    if isinstance(qs, list) and qs:
        return [q for q in qs if isinstance(q, dict) and "name" in q]
    for recs in streams.values():
        for r in recs:
            if r.get("t") == "start" and isinstance(r.get("quantizers"), list):
                return [q for q in r["quantizers"] if isinstance(q, dict) and "name" in q]
    names: list[str] = []
    for recs in streams.values():
        for r in recs:
            if r.get("t") == "step" and r.get("q") not in names:
                names.append(r.get("q"))
    return [{"name": n, "kind": "vq", "library": "unknown", "codebook_size": 0, "dim": 0} for n in names]


def _world_size(meta: dict[str, Any], streams: dict[int, list[dict[str, Any]]]) -> int:
    ws = [int(meta.get("world_size") or 1)]
    for recs in streams.values():
        for r in recs:
            if r.get("t") == "start":
                ws.append(int(r.get("world_size") or 1))
    return max([*ws, len(streams)])


def _aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Rank-aggregated per-step frame (index = step) from per-rank rows of one quantizer."""
    cols = [c for c in df.columns if c not in ("rank", "step", "quantizer", "record")]
    if not cols:
        return pd.DataFrame(index=pd.Index([], name="step"))
    g = df.groupby("step")
    parts = []
    for c in cols:
        parts.append(g[c].sum(min_count=1) if c in SUM_OVER_RANKS else g[c].mean())
    out = pd.concat(parts, axis=1, keys=cols).sort_index()
    out.index.name = "step"
    return out.dropna(axis=1, how="all")


def _hist_intervals(streams: dict[int, list[dict[str, Any]]], name: str) -> tuple[list[U.UsageWindow], int | None]:
    """The `hist` records of one quantizer, one `UsageWindow` per recorded interval (summed over
    ranks, which record the same intervals), in step order; and the window W they were taken with."""
    by_step: dict[int, list[U.UsageWindow]] = {}
    W: int | None = None
    for recs in streams.values():
        for r in recs:
            if r.get("t") != "hist" or r.get("q") != name or not isinstance(r.get("counts"), list):
                continue
            c = np.asarray(r["counts"], dtype=np.float64)
            heads = int(r.get("heads") or 1)
            if c.size % heads:
                continue
            s = int(r["step"])
            W = int(r["window"]) if r.get("window") else W
            span = int(r.get("steps") or 1)
            by_step.setdefault(s, []).append(U.UsageWindow().update(
                c.reshape(heads, -1), steps=span, first_step=int(r.get("first_step", s - span + 1)), last_step=s))
    return [U.merge_ranks(by_step[s]) for s in sorted(by_step)], W


def _hist_windows(streams: dict[int, list[dict[str, Any]]], name: str
                  ) -> tuple[list[int], list[np.ndarray], int | None]:
    """Window counts (over ranks) at each hist step of one quantizer: each interval with the
    ones before it until W steps are covered. Returns (steps, [H, K] window counts, W)."""
    intervals, W = _hist_intervals(streams, name)
    W = W or U.WINDOW_MIN
    steps, out = [], []
    for i, iv in enumerate(intervals):
        acc = U.UsageWindow().merge(iv)
        j = i - 1
        while j >= 0 and acc.steps < W:
            acc = acc.merge(intervals[j])
            j -= 1
        assert acc.counts is not None and iv.last_step is not None
        steps.append(iv.last_step)
        out.append(acc.counts)
    return steps, out, W


def window_usage(streams: dict[int, list[dict[str, Any]]], name: str, window: int
                 ) -> tuple[dict[str, float], str]:
    """Windowed usage of one quantizer over the last `window` steps of a run (all ranks).

    Sums the `hist` records whose interval lies within the last `window` steps; records are kept
    per flush interval, so the window is rounded to whole intervals (at least the latest one).

    Returns:
        (WINDOW_NAMES + window_steps, a note on the steps covered, "" when exact).
    """
    intervals, _ = _hist_intervals(streams, name)
    if not intervals:
        return {}, ""
    last = intervals[-1].last_step
    assert last is not None
    start = last - window + 1
    inside = [iv for iv in intervals if (iv.first_step if iv.first_step is not None else iv.last_step) >= start]
    inside = inside or intervals[-1:]  # shorter than one recorded interval: take the latest one
    acc = U.UsageWindow()
    for iv in inside:
        acc = acc.merge(iv)
    first = acc.first_step if acc.first_step is not None else last
    covered = last - first + 1
    m = acc.compute()
    m["window_steps"] = float(covered)
    note = "" if covered == window else (f"{name or '(root)'}: --window {window} covers the last {covered} "
                                         f"steps (steps {first}..{last}; usage is recorded per interval)")
    return m, note


def _latest(series: pd.DataFrame, flush_every: int) -> dict[str, float]:
    """Latest value of each metric (batch metrics: mean over the last flush interval)."""
    out: dict[str, float] = {}
    for c in series.columns:
        s = pd.to_numeric(series[c], errors="coerce").astype(float)
        s = s[~s.isna()]
        if not len(s):
            continue
        if c in BATCH:
            tail = s[s.index > s.index[-1] - max(1, flush_every)]
            v = float(tail.mean())
        else:
            v = float(s.iloc[-1])
        out[c] = v
    return out


def _mask_short_windows(series: pd.DataFrame, K: int) -> pd.DataFrame:
    """Hit-based windowed metrics set to NaN on rows whose window holds < MIN_HITS_PER_CODE x K vectors.

    Early in a run the window is not full yet: with ~1 vector per code per step, step 0 has
    hit at most a share 1 - 1/e of a uniform codebook, and "dead" would only mean "not drawn
    yet". Such rows are gaps, not values (the recorded run keeps them; this is the evidence).
    """
    if not K or "window_tokens" not in series.columns:
        return series
    wt = pd.to_numeric(series["window_tokens"], errors="coerce")
    short = (wt < MIN_HITS_PER_CODE * K).to_numpy()
    if not short.any():
        return series
    series = series.copy()
    for c in HIT_BASED:
        if c in series.columns:
            series.loc[short, c] = np.nan
    return series


def _rank_diff(streams: dict[int, list[dict[str, Any]]], name: str, code_norm: float | None
               ) -> pd.Series | None:
    """Per fp step: max over ranks and sampled rows of |e_r - e_0| / code_norm_median (rank 0)."""
    fps: dict[int, dict[int, tuple[list[int], np.ndarray]]] = {}
    for rank, recs in streams.items():
        for r in recs:
            if r.get("t") == "fp" and r.get("q") == name and isinstance(r.get("fingerprint"), list):
                fps.setdefault(int(r["step"]), {})[rank] = (list(r.get("rows") or []),
                                                            np.asarray(r["fingerprint"], dtype=np.float64))
    vals: dict[int, float] = {}
    norm = code_norm if code_norm and code_norm > 0 else 1.0
    for s, by_rank in sorted(fps.items()):
        if len(by_rank) < 2 or min(by_rank) != 0:
            continue
        rows0, f0 = by_rank[0]
        nrows = len(rows0)
        d = (len(f0) - FP_BLOCKS) // nrows if nrows else 0
        worst = 0.0
        for rank, (_, f) in by_rank.items():
            if rank == 0 or f.shape != f0.shape:
                continue
            if nrows and d:
                a = f0[: nrows * d].reshape(nrows, d)
                b = f[: nrows * d].reshape(nrows, d)
                worst = max(worst, float(np.linalg.norm(b - a, axis=1).max()) / norm)
            blocks0, blocks = f0[nrows * d:], f[nrows * d:]
            if len(blocks0) and worst == 0.0:
                scale = np.maximum(np.abs(blocks0), 1e-12)
                rel = np.abs(blocks - blocks0) / scale
                if float(rel.max()) > 1e-5:
                    worst = max(worst, float(np.abs(blocks - blocks0).max()) / norm)
        vals[s] = worst
    return pd.Series(vals, dtype=float) if vals else None


def evidence_from_records(meta: dict[str, Any], streams: dict[int, list[dict[str, Any]]]
                          ) -> tuple[Evidence, list[dict[str, Any]], dict[str, np.ndarray], dict[str, Any]]:
    """Evidence for the rules from a run's records (see `observe_run`).

    Returns:
        (evidence, quantizer identities, latest window counts per quantizer, run summary).
    """
    infos = _quantizer_infos(meta, streams)
    world = _world_size(meta, streams)
    config = meta.get("config") or {}
    F = int(config.get("flush_every") or 50)
    df = records_frame(streams)
    codebook_recs: dict[str, dict[str, Any]] = {}
    notes: dict[str, list[str]] = {}
    for recs in streams.values():
        for r in recs:
            if r.get("t") == "codebook" and r.get("q") is not None and r.get("q") not in codebook_recs:
                codebook_recs[r["q"]] = r
    qevs: list[QuantizerEvidence] = []
    window_counts: dict[str, np.ndarray] = {}
    for info in infos:
        name = str(info["name"])
        sub = df[(df["quantizer"] == name) & (df["record"] == "step")] if len(df) else df
        series = _aggregate(sub) if len(sub) else pd.DataFrame(index=pd.Index([], name="step"))
        steps, wins, W = _hist_windows(streams, name)
        if wins:
            window_counts[name] = wins[-1]
        if world > 1:
            # rank-local windowed values are replaced by global ones from the summed hist records
            series = series.drop(columns=[c for c in (*WINDOWED, "window_steps") if c in series.columns])
            if steps:
                wm = U.window_metrics(np.stack(wins))
                extra = pd.DataFrame({k: wm[k] for k in WINDOWED}, index=pd.Index(steps, name="step"))
                extra["window_steps"] = float(W or 0)
                series = series.join(extra, how="outer") if len(series) else extra
        K = int(info.get("codebook_size") or 0)
        series = _mask_short_windows(series, K)
        metrics = _latest(series, F)
        if name in window_counts:
            wm1 = U.window_metrics(window_counts[name])
            metrics.update({k: float(wm1[k]) for k in WINDOWED if not math.isnan(float(wm1[k]))})
            if not U.enough_tokens(metrics.get("window_tokens", math.inf), K):
                for k in HIT_BASED:
                    metrics.pop(k, None)
            metrics.update(U.implicit_usage(window_counts[name], str(info.get("kind")), K, info.get("levels")))
        if world > 1:
            rd = _rank_diff(streams, name, metrics.get("code_norm_median"))
            if rd is not None:
                series = series.join(rd.rename("rank_codebook_max_diff"), how="outer")
                metrics["rank_codebook_max_diff"] = float(rd.iloc[-1])
        for k, v in (codebook_recs.get(name) or {}).items():
            if k in ("t", "step", "q") or k in metrics:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = float(v)
        metrics.setdefault("codebook_size", float(info.get("codebook_size") or 0))
        qevs.append(QuantizerEvidence(
            name=name, kind=str(info.get("kind", "vq")), library=str(info.get("library", "unknown")),
            codebook_size=int(info.get("codebook_size") or 0), dim=int(info.get("dim") or 0),
            heads=int(info.get("heads") or 1), group=info.get("group"), stage=info.get("stage"),
            metric=str(info.get("metric", "euclidean")), ema_rule=info.get("ema_rule"), metrics=metrics,
            series=series.sort_index() if len(series.columns) else None, notes=notes.get(name, [])))
    run_rows = df[df["record"] == "run"] if len(df) else df
    run_series = _aggregate(run_rows) if len(run_rows) else None
    all_steps = sorted(set(df["step"].tolist())) if len(df) else []
    summary = {"world_size": world, "steps": len(all_steps),
               "first_step": all_steps[0] if all_steps else None, "last_step": all_steps[-1] if all_steps else None}
    run: dict[str, float] = {"world_size": float(world), "steps": float(len(all_steps))}
    if run_series is not None and "loss" in run_series.columns:
        loss = pd.to_numeric(run_series["loss"], errors="coerce")
        fin = loss[np.isfinite(loss.to_numpy(dtype=float))]
        if len(fin):
            run["loss"] = float(fin.iloc[-1])
    ev = Evidence(source_kind="run", quantizers=qevs, run=run,
                  run_series=run_series if run_series is not None and len(run_series.columns) else None)
    return ev, infos, window_counts, summary


def observe_run(meta: dict[str, Any], streams: dict[int, list[dict[str, Any]]], paths: list[str], *,
                window: int | None = None) -> Observation:
    """What a run's records show (the run directory read by `live.store.load_records`, or a tail).

    Args:
        meta: meta.json.
        streams: rank -> records of its latest session.
        paths: what to name as the report's source.
        window: report the windowed usage over the last `window` steps instead of the recorder's
            window (the rules still judge the recorded windows).
    """
    ev, infos, window_counts, summary = evidence_from_records(meta, streams)
    errors = [{"where": "watch", "step": r.get("step"), "message": str(r.get("message", ""))}
              for recs in streams.values() for r in recs
              if r.get("t") == "event" and r.get("level") == "error"]
    errors += _unobserved(infos, streams, meta)
    by_name = {q.name: q for q in ev.quantizers}
    notes = []
    reports = []
    for info in infos:
        name = str(info["name"])
        metrics = dict(by_name[name].metrics)
        if window is not None:
            windowed, note = window_usage(streams, name, window)
            metrics.update(windowed)
            notes += [note] if note else []
        hist = U.usage_histogram(window_counts[name]) if name in window_counts else []
        reports.append(QuantizerReport(info=dict(info), metrics=metrics, histogram=hist,
                                       notes=list(info.get("notes") or [])))
    source: dict[str, Any] = {"kind": "run", "paths": list(paths), "torch": meta.get("torch"),
                              "world_size": summary["world_size"], "steps": summary["steps"],
                              "status": meta.get("status")}
    if window is not None:
        source["window"] = {"steps": window, "note": "; ".join(notes)}
    return Observation(evidence=ev, quantizers=reports, source=source, errors=errors,
                       series=run_series(infos, streams))


def _unobserved(infos: list[dict[str, Any]], streams: dict[int, list[dict[str, Any]]],
                meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Error entries for what the run never showed: no quantizer at all, or a quantizer never seen
    in a training forward (no step record with code counts). Without them a report would read
    "healthy" for want of evidence; with them it is incomplete (exit 2 unless findings say 1)."""
    seen = {str(r.get("q")) for recs in streams.values() for r in recs
            if r.get("t") == "step" and (r.get("tokens") or 0) > 0}
    kinds = {str(r.get("t")) for recs in streams.values() for r in recs}
    recorded = ", ".join(sorted(kinds)) or "nothing"
    if not infos:
        return [{"where": "watch", "message": "no quantizer was found in the watched model, so no code "
                 "usage was measured (name it with quantizers=[...] or register an adapter)"}]
    out = []
    for info in infos:
        name = str(info["name"])
        if name in seen:
            continue
        out.append({"where": "watch", "quantizer": name, "message": (
            f"quantizer {name or '(root)'} was never seen in a training forward (train mode, grad "
            f"enabled): no per-step code counts were recorded (records: {recorded}), so its usage "
            f"over the run was not measured" + (" (the run is still being recorded)"
                                                if meta.get("status") == "running" else ""))})
    return out


def run_series(infos: list[dict[str, Any]], streams: dict[int, list[dict[str, Any]]]) -> ReportSeries:
    """Chart data of a run: per-quantizer metrics over steps (averaged over ranks), the
    rank-frequency curve and per-head usage of the usage windows (`hist` records summed over
    ranks), the code-norm histogram of the end-of-run `codebook` record, and the run-wide loss and
    gradient norms. Hit-based values of windows too short to mean "dead" are left out."""
    size = {str(q["name"]): int(q.get("codebook_size") or 0) for q in infos}
    out: dict[str, QuantizerSeries] = {}
    for name in size:
        steps, table = step_table(streams, "step", name, CHART_METRICS)
        wt = table.pop("window_tokens", None)
        k = size[name]
        if wt is not None and k:
            for key in HIT_BASED:
                if key in table:
                    table[key] = [None if w is None or not U.enough_tokens(w, k) else v
                                  for v, w in zip(table[key], wt, strict=True)]
        hsteps, wins, _ = _hist_windows(streams, name)
        heads = int(wins[-1].shape[0]) if wins else 1
        hu: dict[str, Any] = {}
        if wins and heads > 1:
            keep = thin(len(hsteps), 200)
            hu = {"steps": [hsteps[i] for i in keep], "heads": heads,
                  "usage": [head_usage_from_counts(wins[i]) for i in keep]}
        norms = next((r["code_norm_hist"] for recs in streams.values() for r in recs
                      if r.get("t") == "codebook" and r.get("q") == name
                      and isinstance(r.get("code_norm_hist"), dict)), {})
        out[name] = QuantizerSeries(steps=steps, metrics=table, rank_frequency=rank_frequency(wins[-1]) if wins else {},
                                    code_norms=norms, head_usage=hu)
    rsteps, rtable = step_table(streams, "run", None, RUN_METRICS)
    rtable.pop("window_tokens", None)
    return ReportSeries(quantizers=out, run={"steps": rsteps, **rtable} if rtable else {})
