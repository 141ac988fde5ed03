"""What a report's charts show, collected once when the report is built (the one place for it).

The sources collect them (`vqdoctor.sources.run.run_series`: metrics over steps, the
rank-frequency curve and per-head usage from the `hist` records, the code-norm histogram of the
end-of-run `codebook` record, the run-wide loss and gradient norms;
`vqdoctor.sources.checkpoint.checkpoint_series`: rank-frequency and per-head usage from stored
counts, code norms from the codebook) with the pieces here, into one `ReportSeries`.

`with_series(report, series)` returns the report carrying them, with each quantizer's published
reference values (`vqdoctor.results.reference`). Formats then draw from the report alone: they
never read files or import torch. The series are thinned (`MAX_POINTS` steps, `MAX_RANKS` ranks on
a log scale) so a long run's report stays small.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from vqdoctor.metrics import usage as U
from vqdoctor.results.model import Report, ReportSeries
from vqdoctor.results.reference import reference_for

if TYPE_CHECKING:
    import torch

MAX_POINTS = 600
MAX_RANKS = 200
NORM_BINS = 30
CHART_METRICS = ("perplexity", "perplexity_fraction", "usage_window", "dead_fraction", "top1_share",
                 "perplexity_window", "entropy_norm_window", "scale_ratio", "z_norm_median",
                 "code_norm_median", "quant_error_rel", "codes_replaced")
RUN_METRICS = ("loss", "grad_norm_encoder", "grad_norm_decoder", "grad_norm_quantizer")


# ------------------------------------------------------------------------------ small pieces


def thin(n: int, limit: int = MAX_POINTS) -> np.ndarray:
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
    """Usage fraction of each head of `[H, K]` counts (`metrics.usage`: codes not dead)."""
    c = np.asarray(counts, dtype=np.float64)
    dead = U.head_usage(c.reshape(-1, c.shape[-1]))["dead_fraction"]
    return [float(1.0 - d) if math.isfinite(d) else 0.0 for d in dead]


def step_table(streams: dict[int, list[dict[str, Any]]], t: str, name: str | None,
               keys: tuple[str, ...]) -> tuple[list[int], dict[str, list[float | None]]]:
    """Per-step values of `keys` from records of type `t` (of quantizer `name`), rank-averaged,
    thinned to MAX_POINTS steps."""
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
    keep = thin(len(steps))
    steps = [steps[i] for i in keep]
    table: dict[str, list[float | None]] = {}
    for k in keys + ("window_tokens",):
        col = [float(np.mean(acc[s][k])) if k in acc[s] else None for s in steps]
        if any(v is not None for v in col):
            table[k] = _clean(col)
    return steps, table


# ------------------------------------------------------------------------------ attach


def with_series(report: Report, series: ReportSeries | None) -> Report:
    """`report` carrying `series` and, per quantizer, its published reference values."""
    quantizers = [dataclasses.replace(q, reference=reference_for(q.info)) if not q.reference else q
                  for q in report.quantizers]
    return dataclasses.replace(report, quantizers=quantizers, series=series)


__all__ = ["CHART_METRICS", "MAX_POINTS", "RUN_METRICS", "code_norm_record", "head_usage_from_counts",
           "norm_histogram", "rank_frequency", "step_table", "thin", "with_series"]
