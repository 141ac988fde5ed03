"""HTML formats: one self-contained file (inline CSS and SVG, no script, no network) to look at.

Report (`HtmlFormat`): the verdict and diagnosis with its fix; a quantizer table with the
published reference values; charts: perplexity, usage and dead fraction over steps with the
steps the alerts first held marked, scale ratio, loss, a stage x step grid per residual group and
a head x step grid per multi-head quantizer, the rank-frequency curve, the code-norm histograms;
then the ranked findings with evidence and fixes, and errors. Gate result (`HtmlGateFormat`): the
outcome, a table of every check, then the report. Chart data comes from `Report.series` (what
`vqdoctor.results.series` collected); a chart without data is left out. The page's
Content-Security-Policy forbids every network load and every script.
"""

from __future__ import annotations

from html import escape
from typing import Any

from vqdoctor.formats import svg
from vqdoctor.formats.base import Format
from vqdoctor.formats.gate_parts import OUTCOME_TITLE, measured, target_line, threshold
from vqdoctor.formats.parts import (
    PROBE_HINT,
    display_name,
    error_label,
    histogram_summary,
    identity,
    location,
    nesting,
    reference_item,
    source_parts,
    verdict_line,
    wants_probe_hint,
)
from vqdoctor.gate import GateResult, Status
from vqdoctor.numbers import fmt_num, fmt_pct, fmt_value, is_number, one_line
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding

MAX_LINES = 8  # quantizers drawn as lines in one chart; residual groups also get a grid
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
:root{--fg:#111827;--mut:#6b7280;--bd:#e5e7eb;--bg:#f9fafb;--err:#dc2626;--warn:#d97706;--ok:#059669}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}main{max-width:1340px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:26px 0 10px;border-bottom:1px solid var(--bd);
padding-bottom:4px}code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.banner{border-radius:8px;padding:14px 18px;background:#fff;border:1px solid var(--bd);border-left:6px solid var(--ok)}
.banner.failing{border-left-color:var(--err)}.banner.warning{border-left-color:var(--warn)}
.verdict{font-weight:700;text-transform:uppercase;letter-spacing:.04em}.failing .verdict,.sev-error{color:var(--err)}
.warning .verdict,.sev-warning{color:var(--warn)}.healthy .verdict,.sev-info{color:var(--ok)}
.src{color:var(--mut);font-size:12.5px;margin-top:4px}.fix{background:#ecfdf5;border-radius:6px;padding:6px 10px;margin-top:8px}
table{border-collapse:collapse;background:#fff;border:1px solid var(--bd);width:100%}
th,td{padding:5px 8px;border-bottom:1px solid var(--bd);text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600;font-size:12.5px}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ref{color:var(--mut);font-size:12px}.charts{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid var(--bd);border-radius:8px;padding:6px}
svg.chart{display:block;max-width:100%;height:auto}svg .ct{font-weight:600;font-size:13px;fill:#111827}
svg .tick{font-size:10.5px;fill:#6b7280}svg .lab,svg .lg{font-size:10.5px;fill:#374151}svg .mk{font-size:10px;font-weight:600}
svg .grid{stroke:#eef0f3}svg .axis{stroke:#9ca3af}svg .ln{fill:none;stroke-width:1.8}
ol.findings{padding-left:0;list-style:none}ol.findings li{background:#fff;border:1px solid var(--bd);border-radius:8px;
padding:10px 14px;margin:8px 0}ol.findings li.d1{margin-left:28px}ol.findings li.d2{margin-left:56px}
ol.findings li.d3,ol.findings li.d4{margin-left:84px}.ev{color:#374151;font-size:12.5px;margin-top:4px}
.cause{color:#7c3aed;font-size:12.5px}.st-pass{color:var(--ok)}.st-FAIL{color:var(--err);font-weight:700}.st-skip{color:var(--mut)}
.note{color:var(--mut)}footer{color:var(--mut);font-size:12px;margin-top:30px}
"""


def e(text: Any) -> str:
    """HTML-escaped text."""
    return escape(str(text), quote=True)


def _page(title: str, body: list[str]) -> str:
    head = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(title)}</title>", f"<style>{CSS.strip()}</style>", "</head>", "<body>", "<main>"]
    return "\n".join(head + body + ["</main>", "</body>", "</html>"]) + "\n"


def _finite(v: Any) -> bool:
    return is_number(v) and v == v and abs(float(v)) != float("inf")


# ------------------------------------------------------------------------------ report pieces


def report_title(report: Report) -> str:
    """`vqdoctor: failing — scale-mismatch (VQ003)`."""
    d = report.diagnosis
    return f"vqdoctor: {report.verdict}" + (f" — {d.id} ({d.code})" if d else "")


def banner(report: Report) -> list[str]:
    """The verdict, the summary line, the source and the diagnosis with its fix."""
    d = report.diagnosis
    version = f" · vqdoctor {report.tool_version}" if report.tool_version else ""
    out = [f'<section class="banner {e(report.verdict)}" id="verdict">',
           f'<h1><span class="verdict">{e(report.verdict)}</span>'
           + (f" — {e(d.id)} <span class=\"mono\">{e(d.code)}</span>" if d else "") + "</h1>",
           f"<div>{e(verdict_line(report))}</div>",
           f'<div class="src">{e(" · ".join(source_parts(report)))}{e(version)}</div>']
    if d is not None:
        out.append(f'<div style="margin-top:8px"><b>Diagnosis</b> ({e(location(d))}): {e(one_line(d.message))}</div>')
        if d.fix:
            out.append(f'<div class="fix"><b>Fix:</b> {e(one_line(d.fix))}</div>')
    if wants_probe_hint(report):
        out.append(f'<div class="note">Note: {e(PROBE_HINT)}.</div>')
    out.append("</section>")
    return out


def _m(q: QuantizerReport, key: str, pct: bool = False) -> str:
    v = q.metrics.get(key)
    if not _finite(v):
        return "–"
    return fmt_pct(v) if pct else fmt_num(v)


def quantizer_table(report: Report) -> list[str]:
    """A row per quantizer: identity, key metrics, usage, published reference values."""
    if not report.quantizers:
        return []
    out = ['<h2 id="quantizers">Quantizers</h2>', "<table><thead><tr>",
           "<th>quantizer</th><th>kind</th><th>library</th><th>K · D</th><th>perplexity</th>"
           "<th>used</th><th>dead</th><th>top code</th><th>scale ratio</th><th>usage</th>"
           "<th>published reference (info)</th></tr></thead><tbody>"]
    for q in report.quantizers:
        spark, caption = histogram_summary(q)
        refs = "<br>".join(e(reference_item(r)) for r in q.reference) or "–"
        notes = "".join(f'<div class="note">{e(one_line(n))}</div>' for n in q.notes)
        out.append(f"<tr><td><code>{e(display_name(q.name))}</code>{notes}</td>"
                   f"<td>{e(q.info.get('kind', ''))}</td><td>{e(q.info.get('library', ''))}</td>"
                   f"<td>{e(identity(q))}</td><td class=\"n\">{_m(q, 'perplexity')}</td>"
                   f"<td class=\"n\">{_m(q, 'usage_fraction', True)}</td>"
                   f"<td class=\"n\">{_m(q, 'dead_fraction', True)}</td>"
                   f"<td class=\"n\">{_m(q, 'top1_share', True)}</td>"
                   f"<td class=\"n\">{_m(q, 'scale_ratio')}</td>"
                   f"<td><span class=\"mono\">{e(spark)}</span> {e(caption)}</td>"
                   f'<td class="ref">{refs}</td></tr>')
    out.append("</tbody></table>")
    return out


def _marks(report: Report, names: set[str] | None) -> list[tuple[float, str, str]]:
    """(step, code, severity) of the error/warning findings of `names` (None: run-wide too)."""
    out, seen = [], set()
    for f in report.findings:
        if f.step is None or f.severity not in ("error", "warning"):
            continue
        if names is not None and f.quantizer is not None and f.quantizer not in names:
            continue
        key = (f.step, f.code)
        if key not in seen:
            seen.add(key)
            out.append((float(f.step), f.code, f.severity))
    return out


def chart_ids(report: Report) -> list[str]:
    """The `data-chart` ids the report's HTML holds, in page order (a test checks each is drawn)."""
    return [cid for cid, _ in _charts(report)]


def _charts(report: Report) -> list[tuple[str, str]]:
    """(chart id, svg) for every chart the report's series can draw."""
    series = report.series
    if series is None:
        return []
    qs = [q for q in report.quantizers if q.name in series.quantizers]
    by = {q.name: series.quantizers[q.name] for q in qs}
    charts: list[tuple[str, str]] = []
    stepped = [q for q in qs if by[q.name].steps]
    lined = stepped[:MAX_LINES]
    names = {q.name for q in qs}
    marks = _marks(report, names)
    more = f" (first {MAX_LINES} of {len(stepped)})" if len(stepped) > MAX_LINES else ""

    def lines(key: str) -> list[tuple[str, list[int], list[Any]]]:
        return [(display_name(q.name), by[q.name].steps, by[q.name].metrics[key]) for q in lined
                if key in by[q.name].metrics and any(v is not None for v in by[q.name].metrics[key])]

    for cid, key, title, kw in (
            ("perplexity", "perplexity", "Batch perplexity over steps", {"y_label": "perplexity"}),
            ("usage", "usage_window", "Codes used over the window", {"pct": True, "y_range": (0.0, 1.0)}),
            ("dead-fraction", "dead_fraction", "Dead fraction over the window", {"pct": True, "y_range": (0.0, 1.0)}),
            ("scale-ratio", "scale_ratio", "Scale ratio median ||z|| / median ||e|| (log)", {"log_y": True}),
    ):
        ls = lines(key)
        if ls:
            charts.append((cid, svg.line_chart(cid, title + more, ls, marks=marks, **kw)))
    run = series.run or {}
    if run.get("steps") and any(v is not None for v in run.get("loss", [])):
        positive = all(v is None or v > 0 for v in run["loss"])
        charts.append(("loss", svg.line_chart("loss", "Loss over steps" + (" (log)" if positive else ""),
                                              [("loss", run["steps"], run["loss"])],
                                              marks=_marks(report, None), log_y=positive)))
    groups: dict[str, list[QuantizerReport]] = {}
    for q in stepped:
        if q.info.get("group") is not None and q.info.get("stage") is not None:
            groups.setdefault(str(q.info["group"]), []).append(q)
    for g, members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda q: int(q.info["stage"]))
        key = "perplexity_fraction" if all("perplexity_fraction" in by[q.name].metrics for q in members) else "usage_window"
        steps = sorted({s for q in members for s in by[q.name].steps})
        cells = []
        for q in members:
            vals = dict(zip(by[q.name].steps, by[q.name].metrics.get(key, []), strict=False))
            cells.append([vals.get(s) for s in steps])
        label = "perplexity / K" if key == "perplexity_fraction" else "codes used"
        cid = f"stage-grid:{g}"
        charts.append((cid, svg.heat_grid(cid, f"{display_name(g)}: residual stages x steps ({label})",
                                          [f"stage {q.info['stage']}" for q in members], steps, cells,
                                          value_label=label)))
    for q in qs:
        hu = by[q.name].head_usage
        if hu and int(hu.get("heads", 1)) > 1 and hu.get("usage"):
            heads = int(hu["heads"])
            cells = [[row[h] if h < len(row) else None for row in hu["usage"]] for h in range(heads)]
            cid = f"head-grid:{q.name}"
            charts.append((cid, svg.heat_grid(cid, f"{display_name(q.name)}: codes used per head x steps",
                                              [f"head {h}" for h in range(heads)], hu["steps"], cells,
                                              value_label="codes used")))
    rf = [(display_name(q.name), by[q.name].rank_frequency["rank"], by[q.name].rank_frequency["share"])
          for q in qs[:MAX_LINES] if by[q.name].rank_frequency]
    if rf:
        charts.append(("rank-frequency", svg.line_chart(
            "rank-frequency", "Rank-frequency: share of assignments by code rank (log-log)", rf,
            log_x=True, log_y=True, x_label="code rank", y_label="share")))
    for i, q in enumerate(qs):
        cn = by[q.name].code_norms
        if cn and cn.get("counts"):
            cid = f"code-norms:{q.name}"
            charts.append((cid, svg.histogram(cid, f"{display_name(q.name)}: code-vector norms",
                                              cn["edges"], cn["counts"], x_label="||e||",
                                              color=svg.PALETTE[i % len(svg.PALETTE)])))
    return charts


def charts_section(report: Report) -> list[str]:
    """Every chart, each in a card."""
    charts = _charts(report)
    if not charts:
        return []
    return ['<h2 id="charts">Charts</h2>', '<div class="charts">',
            *[f'<div class="card">{s}</div>' for _, s in charts], "</div>"]


def _finding(f: Finding, depth: int, i: int) -> str:
    parts = [f'<li class="d{min(depth, 4)}" id="finding-{i}"><b>{e(f.code)} <code>{e(f.id)}</code></b> '
             f'<span class="sev-{e(f.severity)}">[{e(f.severity)}]</span> '
             f'<span class="mono">{e(location(f))}</span> · confidence {f.confidence:.2f}'
             f"<div>{e(one_line(f.message))}</div>"]
    if f.caused_by:
        parts.append(f'<div class="cause">caused by: <code>{e(f.caused_by)}</code></div>')
    if f.evidence:
        ev = ", ".join(f"<code>{e(k)}={e(fmt_value(v))}</code>" for k, v in f.evidence.items())
        parts.append(f'<div class="ev">evidence: {ev}</div>')
    if f.fix:
        parts.append(f'<div class="fix"><b>Fix:</b> {e(one_line(f.fix))}</div>')
    parts.append("</li>")
    return "".join(parts)


def findings_section(report: Report) -> list[str]:
    """The ranked findings, symptoms indented under their cause; then the errors."""
    out: list[str] = []
    if report.findings:
        out += ['<h2 id="findings">Findings (most likely root cause first)</h2>', '<ol class="findings">']
        out += [_finding(f, d, i) for i, (f, d) in enumerate(zip(report.findings, nesting(report.findings),
                                                                 strict=True), 1)]
        out.append("</ol>")
    else:
        out += ['<h2 id="findings">Findings</h2>', f"<p>{e(verdict_line(report))}</p>"]
    if report.errors:
        out += ['<h2 id="errors">Errors (the analysis is incomplete)</h2>', "<ul>"]
        out += [f"<li><code>{e(error_label(x))}</code>: {e(one_line(str(x.get('message', ''))))}</li>"
                for x in report.errors]
        out.append("</ul>")
    return out


def report_body(report: Report) -> list[str]:
    """Everything of a report's page inside <main>."""
    footer = (f"<footer>vqdoctor {e(report.tool_version)} · one self-contained file: no scripts, "
              f"no network · reference values are published figures (info, not judgement)</footer>")
    return banner(report) + quantizer_table(report) + charts_section(report) + findings_section(report) + [footer]


class HtmlFormat(Format):
    """A report as one self-contained HTML page with inline SVG charts."""

    name = "html"
    suffix = ".html"
    result = "report"

    def render(self, report: Report) -> str:
        """Render `report` as an HTML document."""
        return _page(report_title(report), report_body(report))


# ============================================================================ gate result


class HtmlGateFormat(Format):
    """A gate result as one self-contained HTML page: outcome, checks, then the report."""

    name = "html"
    suffix = ".html"
    result = "gate"

    def render(self, result: GateResult) -> str:
        """Render `result` as an HTML document."""
        cls = {"pass": "healthy", "fail": "failing", "incomplete": "warning"}[result.outcome]
        body = [f'<section class="banner {cls}" id="gate">',
                f'<h1><span class="verdict">gate {e(OUTCOME_TITLE[result.outcome])}</span></h1>',
                f"<div>{e(result.summary_line())}</div>",
                f'<div class="src">{e(target_line(result))}</div></section>',
                '<h2 id="checks">Checks</h2>',
                "<table><thead><tr><th>status</th><th>quantizer</th><th>check</th><th>measured</th>"
                "<th>threshold</th><th>detail</th></tr></thead><tbody>"]
        label = {Status.PASS: "pass", Status.FAIL: "FAIL", Status.SKIP: "skip"}
        for c in result.checks:
            shown = measured(c) if c.status is not Status.SKIP else "–"
            detail = e(one_line(c.message)) + (f" · <code>{e(c.metric)}</code>, {e(c.source)}" if c.source else "")
            body.append(f'<tr><td class="st-{label[c.status]}">{label[c.status]}</td>'
                        f"<td><code>{e(c.subject)}</code></td><td>{e(c.name)}</td>"
                        f'<td class="n">{e(shown)}</td><td>{e(threshold(c))}</td><td>{detail}</td></tr>')
        body.append("</tbody></table>")
        body += [f'<p class="note">could not analyse: {e(p)}</p>' for p in result.problems]
        body += [f'<p class="note">note: {e(n)}</p>' for n in result.notes]
        body += ['<h2 id="report">The diagnosis behind it</h2>'] + report_body(result.report)
        return _page(f"vqdoctor gate {OUTCOME_TITLE[result.outcome]}", body)


__all__ = ["HtmlFormat", "HtmlGateFormat", "chart_ids", "report_body"]
