"""Pieces of a report that several formats share: the header, a quantizer's identity and key
metrics, the usage sparkline, the nesting of findings under their cause, the closing line.

Pure functions of the `Report`; numbers go through `vqdoctor.numbers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from vqdoctor.numbers import fmt_num, fmt_pct, is_number
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding

# --- report pieces ---------------------------------------------------------------------------


def source_parts(report: Report) -> list[str]:
    """Header pieces: what was read, its format, whether the load was safe, the probe."""
    src = report.source
    kind = str(src.get("kind", "checkpoint"))
    paths = [str(p) for p in src.get("paths", []) or []]
    if len(paths) > 2:
        where = f"{kind}s {paths[0]} ... {paths[-1]} ({len(paths)}, oldest first)"
    elif len(paths) == 2:
        where = f"{kind}s {paths[0]} -> {paths[1]}"
    elif paths:
        where = f"{kind} {paths[0]}"
    else:
        where = kind
    parts = [where]
    if src.get("format"):
        parts.append(str(src["format"]))
    if "safe_load" in src:
        parts.append("safe load" if src["safe_load"] else "UNSAFE load (trusted pickle)")
    if src.get("probe"):
        entries = src.get("probe_entries") or {}
        used = sorted(set(entries.values())) if isinstance(entries, dict) else []
        parts.append(f"probe {src['probe']}" + (f" (entr{'ies' if len(used) > 1 else 'y'} "
                                                f"{', '.join(used)})" if used else ""))
    return parts


def has_probe(report: Report) -> bool:
    """True when encoder outputs were given, so scale could be checked."""
    return bool(report.source.get("probe")) or any(
        "z_norm_median" in q.metrics or "scale_ratio" in q.metrics for q in report.quantizers)


def wants_probe_hint(report: Report) -> bool:
    """A checkpoint report without a probe, where scale was not already diagnosed."""
    return (report.source.get("kind", "checkpoint") == "checkpoint" and not has_probe(report)
            and not any(f.id == "scale-mismatch" for f in report.findings))


PROBE_HINT = ("no probe given: a probe of encoder outputs (--probe FILE) would also check "
              "their scale against the codebook")


def identity(q: QuantizerReport) -> str:
    """`K=1024 D=128 heads=4 stage=2` from a quantizer's info."""
    info = q.info
    parts = []
    if info.get("codebook_size") is not None:
        parts.append(f"K={info['codebook_size']}")
    if info.get("dim") is not None:
        parts.append(f"D={info['dim']}")
    if int(info.get("heads", 1) or 1) > 1:
        parts.append(f"heads={info['heads']}")
    if info.get("stage") is not None:
        parts.append(f"stage={info['stage']}")
    if info.get("levels"):
        parts.append("levels=" + ",".join(str(x) for x in info["levels"]))
    return " ".join(parts)


def metric_items(q: QuantizerReport) -> list[str]:
    """The key metrics of one quantizer as short `label value` items, most telling first."""
    m, k = q.metrics, q.info.get("codebook_size")
    items: list[str] = []

    def num(key: str) -> Any:
        v = m.get(key)
        return v if is_number(v) else None

    if num("perplexity") is not None:
        items.append(f"perplexity {fmt_num(m['perplexity'])}" + (f" of {k}" if k else ""))
    if num("usage_fraction") is not None:
        items.append(f"used {fmt_pct(m['usage_fraction'])}")
    if num("dead_fraction") is not None:
        items.append(f"dead {fmt_pct(m['dead_fraction'])}")
    if num("top1_share") is not None:
        items.append(f"top code {fmt_pct(m['top1_share'])}")
    if num("code_norm_median") is not None:
        items.append(f"code norm {fmt_num(m['code_norm_median'])}")
    if num("z_norm_median") is not None:
        items.append(f"input norm {fmt_num(m['z_norm_median'])}")
    if num("scale_ratio") is not None:
        items.append(f"scale ratio {fmt_num(m['scale_ratio'])}")
    if num("probe_perplexity") is not None:
        items.append(f"probe perplexity {fmt_num(m['probe_perplexity'])}")
    if num("nonfinite_total"):
        items.append(f"non-finite {fmt_num(m['nonfinite_total'])}")
    if num("codebook_rel_change") is not None:
        items.append(f"codebook moved {fmt_pct(m['codebook_rel_change'])}")
    return items


# --- usage histogram -------------------------------------------------------------------------

SPARK = "▁▂▃▄▅▆▇█"
SPARK_EMPTY = "·"
MAX_BARS = 32


def usage_shares(histogram: Sequence[float], max_bars: int = MAX_BARS) -> list[float]:
    """Shares of assignments per bucket of codes, most used bucket first, summing to 1.

    `QuantizerReport.histogram` holds the share (or count) of assignments per bucket of codes
    sorted by use; it is normalised and sorted here again so that raw counts per code bin also
    read right. More than `max_bars` buckets are merged pairwise. Returns [] when there is
    nothing to show.
    """
    vals = [float(v) if is_number(v) and math.isfinite(float(v)) and v > 0 else 0.0
            for v in histogram]
    total = sum(vals)
    if not vals or total <= 0:
        return []
    vals.sort(reverse=True)
    while len(vals) > max_bars:
        vals = [sum(vals[i:i + 2]) for i in range(0, len(vals), 2)]
    return [v / total for v in vals]


def sparkline(shares: Sequence[float]) -> str:
    """Block characters, bar height relative to the largest share; an empty bucket is '·'."""
    top = max(shares, default=0.0)
    if top <= 0:
        return ""
    out = []
    for s in shares:
        if s <= 0:
            out.append(SPARK_EMPTY)
        else:
            out.append(SPARK[min(len(SPARK) - 1, max(0, math.ceil(s / top * len(SPARK)) - 1))])
    return "".join(out)


def usage_caption(shares: Sequence[float]) -> str:
    """`top 5% of codes take 98% of assignments`: the first bar in words (uniform: 5% take 5%)."""
    return f"top {fmt_pct(1 / len(shares))} of codes take {fmt_pct(shares[0])} of assignments"


def histogram_summary(q: QuantizerReport) -> tuple[str, str]:
    """(sparkline, caption) for a quantizer; sparkline is "" when there are no counts."""
    if not q.histogram:
        total = q.metrics.get("count_total")
        if is_number(total) and total == 0:
            return "", "no assignments counted (all usage counts are zero)"
        return "", "n/a (no usage counts stored)"
    shares = usage_shares(q.histogram)
    if not shares:
        return "", "no assignments counted"
    return sparkline(shares), usage_caption(shares)


# --- findings --------------------------------------------------------------------------------


def display_name(name: str | None) -> str:
    """A quantizer's name for people: "(root)" when the checkpoint is the quantizer itself."""
    return name if name else "(root)"


def location(f: Finding) -> str:
    """`quantizer.layers.0 @step 120`, or `run` for run-wide findings."""
    where = "run" if f.quantizer is None else display_name(f.quantizer)
    return f"{where} @step {f.step}" if f.step is not None else where


def nesting(findings: Sequence[Finding]) -> list[int]:
    """Depth of each finding under the cause it names (0 for a root cause).

    The ranking emits each symptom right after its cause, so the parent is the nearest earlier
    finding whose id is the symptom's `caused_by`.
    """
    depths: list[int] = []
    for i, f in enumerate(findings):
        depth = 0
        if f.caused_by:
            for j in range(i - 1, -1, -1):
                if findings[j].id == f.caused_by:
                    depth = depths[j] + 1
                    break
        depths.append(depth)
    return depths


def error_label(err: dict[str, Any]) -> str:
    """Who failed, for one `Report.errors` entry: `dead-codes (VQ005)`, a place, or "error"."""
    name = err.get("rule") or err.get("id") or err.get("where")
    code = err.get("code")
    if name and code:
        return f"{name} ({code})"
    return str(name or code or "error")


def verdict_line(report: Report) -> str:
    """The closing line: plain "healthy: ..." or the summary line with the diagnosis."""
    if report.verdict == "healthy":
        n = len(report.quantizers)
        text = f"healthy: no problems found in {n} quantizer{'s' * (n != 1)}"
        infos = report.count("info")
        if infos:
            text += f" ({infos} note{'s' * (infos != 1)})"
        return text
    return report.summary_line()


# --- published reference values --------------------------------------------------------------


def reference_item(r: dict[str, Any]) -> str:
    """`VQGAN K=65536: 1.4% of codes used (source)` for one published figure."""
    k = r.get("codebook_size")
    size = f" K={k}" if k else ""
    used = fmt_pct(r.get("utilization"))
    qual = {"<": "under ", "~": "about "}.get(str(r.get("qualifier", "")), "")
    note = f" {r['note']}" if r.get("note") else ""
    return f"{r.get('model', '?')}{size}: {qual}{used} of codes used{note} ({r.get('source', '')})"


def reference_line(q: QuantizerReport) -> str:
    """The published figures carried by a quantizer, joined; "" when it carries none."""
    return "; ".join(reference_item(r) for r in q.reference)
