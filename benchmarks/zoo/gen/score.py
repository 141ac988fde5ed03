"""Judge vqdoctor's reports on the generated zoo and turn them into tables with Wilson intervals.

Definitions (per mode: watch, inspect, inspect+probe; confirmed variants only):

- *diagnosis*: the id of the first finding of severity error or warning (findings are ranked,
  root cause first); "healthy" when there is none; "n/a" when no report was produced.
- *top-1* / *top-3* (faulty variants): the expected id is the diagnosis / among the first three
  error-or-warning findings. A missing report counts as wrong.
- *false alarm at error* (healthy variants): the report holds a finding of severity error.
  *False alarm at warning*: it holds a finding of severity error or warning (the report is not
  "healthy"). A missing report is counted apart ("no report"), never as healthy.
- *discovery*: the report's `quantizers` list holds, for every generated codebook size K, at
  least as many entries with `codebook_size == K` as the spec has codebooks (residual stages
  count one each); a missing report counts as not discovered.
- Intervals: Wilson score, 95%.

Held-out protection: `holdout_tables` prints aggregates only (overall, per library version,
per fault class); the per-variant rows of the held-out split go only to the file the runner
names `holdout_private.json`.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

MODES = ("watch", "inspect", "inspect+probe")
TARGETS = {"watch": 0.95, "inspect": 0.70, "inspect+probe": 0.85}
FA_TARGETS = {"error": 0.0, "warning": 0.02}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def fmt(k: int, n: int) -> str:
    """'k/n (p%, 95% CI lo-hi%)'."""
    if n == 0:
        return "-"
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({100 * k / n:.0f}%, {100 * lo:.0f}-{100 * hi:.0f})"


def judge(report: dict | None, expect: str, onset: int, expected_q: list[dict]) -> dict[str, Any]:
    """Diagnosis, top-1 / top-3, the worst severity, discovery and alert latency of one report."""
    if report is None:
        return {"top": "n/a", "top3": [], "ok1": False, "ok3": False, "worst": "n/a", "found": False,
                "alert": None, "held": None, "quantizers": []}
    fs = [f for f in report.get("findings", []) if f.get("severity") in ("error", "warning")]
    ids = [f["id"] for f in fs]
    top = ids[0] if ids else "healthy"
    worst = "error" if any(f["severity"] == "error" for f in fs) else ("warning" if fs else "none")
    qs = [(q.get("name"), q.get("codebook_size")) for q in report.get("quantizers", [])]
    found = all(sum(1 for _, k in qs if k == e["K"]) >= e["count"] for e in expected_q)
    steps = [f["step"] for f in fs if isinstance(f.get("step"), int) and f["step"] >= onset]
    held = [f["step"] for f in fs if f["id"] == expect and isinstance(f.get("step"), int) and f["step"] >= onset]
    return {"top": top, "top3": ids[:3], "ok1": top == expect,
            "ok3": (top == expect) if expect == "healthy" else expect in ids[:3],
            "worst": worst, "found": found, "quantizers": qs,
            "alert": min(steps) - onset if steps else None, "held": min(held) - onset if held else None,
            "message": fs[0].get("message", "")[:200] if fs else ""}


def version_group(r: dict) -> str:
    return f"vector-quantize-pytorch {r['libver']}" if r.get("libver") else "other libraries"


def aggregate(rows: list[dict]) -> dict[str, Any]:
    """Counts per mode over confirmed rows: top-1, top-3, false alarms, discovery, latency."""
    rows = [r for r in rows if r.get("confirmed")]
    faulty = [r for r in rows if r["expect"] != "healthy"]
    healthy = [r for r in rows if r["expect"] == "healthy"]
    out: dict[str, Any] = {"n": len(rows), "faulty": len(faulty), "healthy": len(healthy), "modes": {}}
    for mode in MODES:
        js = [(r, r["modes"].get(mode)) for r in rows]
        js = [(r, j) for r, j in js if j is not None]
        if not js:
            continue
        fj = [j for r, j in js if r["expect"] != "healthy"]
        hj = [j for r, j in js if r["expect"] == "healthy"]
        lat = [j["alert"] for j in fj if j.get("alert") is not None]
        out["modes"][mode] = {
            "top1": (sum(j["ok1"] for j in fj), len(fj)),
            "top3": (sum(j["ok3"] for j in fj), len(fj)),
            "fa_error": (sum(j["worst"] == "error" for j in hj), len(hj)),
            "fa_warning": (sum(j["worst"] in ("error", "warning") for j in hj), len(hj)),
            "no_report": (sum(j["worst"] == "n/a" for j in hj), len(hj)),
            "discovery": (sum(j["found"] for _, j in js), len(js)),
            "alert_median": statistics.median(lat) if lat else None,
        }
    return out


def _mode_table(agg: dict[str, Any], title: str) -> list[str]:
    lines = [f"| {title} | top-1 (target) | top-3 | false alarms: error (target 0) | "
             "false alarms: warning or error (target <= 2%) | no report (healthy) | discovery (target 100%) |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        m = agg["modes"].get(mode)
        if m is None:
            lines.append(f"| {mode} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        lines.append(f"| {mode} | {fmt(*m['top1'])} (>= {TARGETS[mode]:.0%}) | {fmt(*m['top3'])} | "
                     f"{fmt(*m['fa_error'])} | {fmt(*m['fa_warning'])} | {fmt(*m['no_report'])} | "
                     f"{fmt(*m['discovery'])} |")
    return lines


def _group_table(rows: list[dict], key, title: str) -> list[str]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("confirmed"):
            groups[key(r)].append(r)
    lines = [f"| {title} | n | " + " | ".join(f"{m} top-1 / FA warning+error / discovery" for m in MODES) + " |",
             "|---|---|" + "---|" * len(MODES)]
    for g in sorted(groups):
        agg = aggregate(groups[g])
        cells = []
        for mode in MODES:
            m = agg["modes"].get(mode)
            if m is None:
                cells.append("n/a")
                continue
            t1 = fmt(*m["top1"]) if m["top1"][1] else "-"
            fa = fmt(*m["fa_warning"]) if m["fa_warning"][1] else "-"
            cells.append(f"{t1} / {fa} / {fmt(*m['discovery'])}")
        lines.append(f"| {g} | {len(groups[g])} | " + " | ".join(cells) + " |")
    return lines


def dropped_table(rows: list[dict], with_ids: bool) -> list[str]:
    """Variants left out of the scoring, with the reason (ids only for the tuning split)."""
    drops = [r for r in rows if not r.get("confirmed")]
    if not drops:
        return ["No variant was dropped."]
    if not with_ids:
        by = defaultdict(int)
        for r in drops:
            by[r["expect"]] += 1
        return [f"{len(drops)} variants dropped (label not confirmed): "
                + ", ".join(f"{k} {v}" for k, v in sorted(by.items()))]
    lines = ["| variant | expect | kind | mechanism / variant | why it was dropped |", "|---|---|---|---|---|"]
    for r in sorted(drops, key=lambda r: r["id"]):
        lines.append(f"| {r['id']} | {r['expect']} | {r['kind']} | {r.get('mechanism') or r.get('variant')} | "
                     f"{r.get('reason', '')[:160]} |")
    return lines


def scenario_table(rows: list[dict]) -> list[str]:
    """Per-variant rows (tuning split only)."""
    lines = ["| variant | expect | kind | version | mechanism / variant | pattern | container | probe | K | "
             + " | ".join(MODES) + " | found (w/i/p) |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(MODES) + "---|"]
    for r in sorted(rows, key=lambda r: r["id"]):
        if not r.get("confirmed"):
            continue
        cells, found = [], []
        for mode in MODES:
            j = r["modes"].get(mode)
            if j is None:
                cells.append("n/a")
                found.append("-")
                continue
            cells.append(f"{j['top']} {'✓' if j['ok1'] else '✗'}")
            found.append("y" if j["found"] else "n")
        lines.append(f"| {r['id']} | {r['expect']} | {r['kind']} | {r.get('libver') or '-'} | "
                     f"{r.get('mechanism') or r.get('variant')} | {r['pattern_tag']} | {r['container']} | {r['probe']} | "
                     f"{r['K']}x{r['stages']} | " + " | ".join(cells) + f" | {'/'.join(found)} |")
    return lines


def failure_summary(rows: list[dict]) -> list[str]:
    """Per fault class and mode: misses with up to two example ids and what vqdoctor answered."""
    lines = ["| class | mode | correct | examples of misses (id: answer) |", "|---|---|---|---|"]
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("confirmed"):
            by[r["expect"]].append(r)
    for cls in sorted(by):
        for mode in MODES:
            js = [(r, r["modes"].get(mode)) for r in by[cls] if r["modes"].get(mode) is not None]
            if not js:
                continue
            miss = [(r, j) for r, j in js if not j["ok1"]]
            ex = "; ".join(f"{r['id']}: {j['top']}" for r, j in miss[:2])
            lines.append(f"| {cls} | {mode} | {len(js) - len(miss)}/{len(js)} | {ex or '-'} |")
    return lines


def tune_tables(rows: list[dict]) -> str:
    """Everything about the tuning split: aggregates, groups, per-variant rows, misses, drops."""
    out = ["### Tuning split", "", *_mode_table(aggregate(rows), "mode"), "",
           *_group_table(rows, version_group, "library version"), "",
           *_group_table(rows, lambda r: r["expect"], "fault class"), "",
           *_group_table(rows, lambda r: r["library"], "library"), "",
           *_group_table(rows, lambda r: r["pattern_tag"], "call pattern"), "",
           *_group_table(rows, lambda r: r["container"], "container"), "",
           "Misses by class:", "", *failure_summary(rows), "",
           "Dropped (label not confirmed):", "", *dropped_table(rows, True), "",
           "Per variant:", "", *scenario_table(rows)]
    return "\n".join(out)


def holdout_tables(rows: list[dict]) -> str:
    """The held-out split: aggregates only (no per-variant rows, nothing finer than the class)."""
    out = ["### Held-out split (aggregates only)", "", *_mode_table(aggregate(rows), "mode"), "",
           *_group_table(rows, version_group, "library version"), "",
           *_group_table(rows, lambda r: r["expect"], "fault class"), "",
           *dropped_table(rows, False)]
    return "\n".join(out)


def thirdparty_tables(rows: list[dict]) -> str:
    """The third-party set: one row per case (public cases, not a held-out split)."""
    lines = ["### Third-party cases", "", "| case | follows | expect | confirmed | " + " | ".join(MODES) + " |",
             "|---|---|---|---|" + "---|" * len(MODES)]
    for r in rows:
        cells = []
        for mode in MODES:
            j = r["modes"].get(mode)
            cells.append("n/a" if j is None else f"{j['top']} {'✓' if j['ok1'] else '✗'}")
        lines.append(f"| {r['id']} | {r['follows']} | {r['expect']} | "
                     f"{'yes' if r['confirmed'] else 'no: ' + r.get('reason', '')[:80]} | " + " | ".join(cells) + " |")
    lines += ["", *_mode_table(aggregate(rows), "mode")]
    return "\n".join(lines)
