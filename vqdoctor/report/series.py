"""What a report's charts show, collected once when the report is built (the one place for it).

Two sources, one result (`vqdoctor.report.model.ReportSeries`):

- `run_series(meta, streams)`: a recorded run (records as `vqdoctor.watch.store.load_records`
  gives them): per-quantizer metrics over steps (averaged over ranks), the rank-frequency curve
  and per-head usage from the `hist` records (summed over ranks), the code-norm histogram from
  the end-of-run `codebook` record, and the run-wide loss / gradient norms;
- `checkpoint_series(states)`: checkpoint quantizer states: the rank-frequency curve and per-head
  usage from stored counts, the code-norm histogram from the codebook.

`with_series(report, series)` returns the report carrying them, with each quantizer's published
reference values (`vqdoctor.report.reference`). Formats then draw from the report alone: they
never read files or import torch. The series are thinned (`MAX_POINTS` steps, `MAX_RANKS` ranks on
a log scale) so a long run's report stays small.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from vqdoctor.report.model import QuantizerSeries, Report, ReportSeries
from vqdoctor.report.reference import reference_for

if TYPE_CHECKING:
    import torch

    from vqdoctor.quantizers.base import QuantizerState

MAX_POINTS = 600
MAX_RANKS = 200
NORM_BINS = 30
CHART_METRICS = ("perplexity", "perplexity_fraction", "usage_window", "dead_fraction", "top1_share",
                 "perplexity_window", "entropy_norm_window", "scale_ratio", "z_norm_median",
                 "code_norm_median", "quant_error_rel", "codes_replaced")
RUN_METRICS = ("loss", "grad_norm_encoder", "grad_norm_decoder", "grad_norm_quantizer")
HIT_BASED = ("usage_window", "dead_fraction")
MIN_HITS_PER_CODE = 4.0  # as vqdoctor.watch.stats: a window this short says nothing about dead codes


# ------------------------------------------------------------------------------ small pieces


def _thin(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most `limit` evenly spaced points of n, first and last included."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _clean(values: Any) -> list[float | None]:
    return [float(v) if v is not None and math.isfinite(float(v)) else None for v in values]


def rank_frequency(counts: np.ndarray, limit: int = MAX_RANKS) -> dict[str, list[float]]:
    """Codes sorted by use: share of assignments at ranks 1..K, thinned on a log scale.

    Args:
        counts: per-code counts, `[K]` or `[H, K]` (heads summed).
        limit: at most this many points.

    Returns:
        {"rank": [...], "share": [...]}, or {} when nothing was counted.
    """
    c = np.nan_to_num(np.asarray(counts, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    c = np.clip(c.reshape(-1, c.shape[-1]), 0.0, None).sum(0)
    total = float(c.sum())
    if not (total > 0):
        return {}
    shares = np.sort(c)[::-1] / total
    k = len(shares)
    ranks = np.unique(np.geomspace(1, k, num=min(limit, k)).round().astype(int))
    return {"rank": [int(r) for r in ranks], "share": [float(shares[r - 1]) for r in ranks]}


def norm_histogram(norms: np.ndarray, bins: int = NORM_BINS) -> dict[str, list[float]]:
    """Histogram of code-vector norms (finite values): {"edges": bins + 1, "counts": bins}."""
    x = np.asarray(norms, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not len(x):
        return {}
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-3
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(n) for n in counts]}


def code_norm_record(codebook: torch.Tensor | None) -> dict[str, Any]:
    """`{"code_norm_hist": {...}}` for a `codebook` record of a run (empty without a codebook).

    Called at the end of a watched session on the CPU copy of the live codebook, so a run's
    report can draw the code-norm histogram like a checkpoint's.
    """
    if codebook is None:
        return {}
    try:
        import torch

        with torch.no_grad():
            norms = torch.linalg.vector_norm(codebook.detach().float().cpu(), dim=-1).numpy()
        h = norm_histogram(norms)
    except Exception:  # a chart must never cost the run record
        return {}
    return {"code_norm_hist": h} if h else {}


def head_usage_from_counts(counts: np.ndarray) -> list[float]:
    """Share of each head's codes with a non-zero count, for `[H, K]` counts."""
    c = np.asarray(counts, dtype=np.float64)
    c = c.reshape(-1, c.shape[-1])
    return [float((np.nan_to_num(row) > 0).mean()) for row in c]


# ------------------------------------------------------------------------------ runs


def _hist_windows(streams: dict[int, list[dict[str, Any]]], name: str
                  ) -> tuple[list[int], list[np.ndarray], int]:
    """Window counts `[H, K]` (summed over ranks) at each hist step of one quantizer."""
    by_step: dict[int, np.ndarray] = {}
    span: dict[int, int] = {}
    window, heads = 0, 1
    for recs in streams.values():
        for r in recs:
            if r.get("t") != "hist" or r.get("q") != name or not isinstance(r.get("counts"), list):
                continue
            c = np.asarray(r["counts"], dtype=np.float64)
            s = int(r["step"])
            heads = int(r.get("heads") or 1)
            window = int(r.get("window") or window or 0)
            by_step[s] = by_step[s] + c if s in by_step and by_step[s].shape == c.shape else c
            span[s] = int(r.get("steps") or 1)
    steps = sorted(by_step)
    out = []
    for i, s in enumerate(steps):
        acc, covered, j = by_step[s].copy(), span[s], i - 1
        while j >= 0 and covered < max(window, 1):
            if by_step[steps[j]].shape == acc.shape:
                acc += by_step[steps[j]]
            covered += span[steps[j]]
            j -= 1
        out.append(acc.reshape(heads, -1))
    return steps, out, heads


def _step_table(streams: dict[int, list[dict[str, Any]]], t: str, name: str | None,
                keys: tuple[str, ...]) -> tuple[list[int], dict[str, list[float | None]]]:
    """Per-step values of `keys` from records of type `t` (of quantizer `name`), rank-averaged."""
    acc: dict[int, dict[str, list[float]]] = {}
    for recs in streams.values():
        for r in recs:
            if r.get("t") != t or (name is not None and r.get("q") != name):
                continue
            s = r.get("step")
            if not isinstance(s, int):
                continue
            row = acc.setdefault(s, {})
            for k in keys + ("window_tokens",):
                v = r.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    row.setdefault(k, []).append(float(v))
    steps = sorted(acc)
    keep = _thin(len(steps))
    steps = [steps[i] for i in keep]
    table: dict[str, list[float | None]] = {}
    for k in keys + ("window_tokens",):
        col = [float(np.mean(acc[s][k])) if k in acc[s] else None for s in steps]
        if any(v is not None for v in col):
            table[k] = _clean(col)
    return steps, table


def run_series(meta: dict[str, Any], streams: dict[int, list[dict[str, Any]]]) -> ReportSeries:
    """Chart data of a recorded run (see the module docstring).

    Args:
        meta: meta.json of the run ({} when absent).
        streams: rank -> records, as `vqdoctor.watch.store.load_records` returns them.
    """
    infos = [q for q in (meta.get("quantizers") or []) if isinstance(q, dict) and "name" in q]
    if not infos:
        for recs in streams.values():
            for r in recs:
                if r.get("t") == "start" and isinstance(r.get("quantizers"), list):
                    infos = [q for q in r["quantizers"] if isinstance(q, dict) and "name" in q]
                    break
            if infos:
                break
    names = [str(q["name"]) for q in infos]
    for recs in streams.values():
        for r in recs:
            if r.get("t") == "step" and r.get("q") is not None and str(r["q"]) not in names:
                names.append(str(r["q"]))
    size = {str(q["name"]): int(q.get("codebook_size") or 0) for q in infos}
    out: dict[str, QuantizerSeries] = {}
    for name in names:
        steps, table = _step_table(streams, "step", name, CHART_METRICS)
        wt = table.pop("window_tokens", None)
        k = size.get(name, 0)
        if wt is not None and k:  # an unfilled window's "dead" codes are codes not drawn yet
            for key in HIT_BASED:
                if key in table:
                    table[key] = [None if w is None or w < MIN_HITS_PER_CODE * k else v
                                  for v, w in zip(table[key], wt, strict=True)]
        hsteps, wins, heads = _hist_windows(streams, name)
        rf = rank_frequency(wins[-1]) if wins else {}
        hu: dict[str, Any] = {}
        if wins and heads > 1:
            keep = _thin(len(hsteps), 200)
            hu = {"steps": [hsteps[i] for i in keep], "heads": heads,
                  "usage": [head_usage_from_counts(wins[i]) for i in keep]}
        norms: dict[str, Any] = {}
        for recs in streams.values():
            for r in recs:
                if r.get("t") == "codebook" and r.get("q") == name and isinstance(r.get("code_norm_hist"), dict):
                    norms = r["code_norm_hist"]
            if norms:
                break
        out[name] = QuantizerSeries(steps=steps, metrics=table, rank_frequency=rf, code_norms=norms,
                                    head_usage=hu)
    rsteps, rtable = _step_table(streams, "run", None, RUN_METRICS)
    rtable.pop("window_tokens", None)
    run = {"steps": rsteps, **rtable} if rtable else {}
    return ReportSeries(quantizers=out, run=run)


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_series(states: list[QuantizerState]) -> ReportSeries:
    """Chart data of checkpoint quantizers: rank-frequency, per-head usage, code norms."""
    import torch

    out: dict[str, QuantizerSeries] = {}
    for s in states:
        rf: dict[str, Any] = {}
        hu: dict[str, Any] = {}
        norms: dict[str, Any] = {}
        try:
            with torch.no_grad():
                if s.cluster_size is not None:
                    c = s.cluster_size.detach().float().cpu()
                    c = c.reshape(-1, c.shape[-1]).numpy()
                    rf = rank_frequency(c)
                    if c.shape[0] > 1:
                        hu = {"steps": [0], "heads": int(c.shape[0]), "usage": [head_usage_from_counts(c)]}
                if s.codebook is not None:
                    norms = norm_histogram(torch.linalg.vector_norm(s.codebook.detach().float(), dim=-1).numpy())
        except Exception:  # charts are extras: a quantizer they cannot read is drawn without them
            pass
        out[s.name] = QuantizerSeries(rank_frequency=rf, code_norms=norms, head_usage=hu)
    return ReportSeries(quantizers=out)


# ------------------------------------------------------------------------------ attach


def with_series(report: Report, series: ReportSeries | None) -> Report:
    """`report` carrying `series` and, per quantizer, its published reference values."""
    quantizers = [dataclasses.replace(q, reference=reference_for(q.info)) if not q.reference else q
                  for q in report.quantizers]
    return dataclasses.replace(report, quantizers=quantizers, series=series)


__all__ = ["CHART_METRICS", "MAX_POINTS", "checkpoint_series", "code_norm_record", "norm_histogram",
           "rank_frequency", "run_series", "with_series"]
