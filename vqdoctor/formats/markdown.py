"""Markdown formats: for pull-request comments, `$GITHUB_STEP_SUMMARY` and notebooks.

Report (`MarkdownFormat`): a title with the verdict, the source, a quantizer table (with the
published reference values), the ranked findings as a numbered list with evidence and fix, and
errors. Gate result (`MarkdownGateFormat`): the verdict as a title, the target, a table of every
check, and the top findings with their fixes. Both render on GitHub and in Jupyter.
"""

from __future__ import annotations

from vqdoctor.formats.base import Format
from vqdoctor.formats.gate_parts import (
    OUTCOME_TITLE,
    measured,
    target_line,
    threshold,
    top_findings,
)
from vqdoctor.formats.parts import (
    PROBE_HINT,
    display_name,
    error_label,
    histogram_summary,
    location,
    reference_line,
    source_parts,
    verdict_line,
    wants_probe_hint,
)
from vqdoctor.gate import GateResult, Status
from vqdoctor.numbers import fmt_num, fmt_pct, fmt_value, one_line
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding

_ESCAPE = str.maketrans({"\\": "\\\\", "*": "\\*", "`": "\\`", "|": "\\|", "<": "&lt;",
                         ">": "&gt;", "[": "\\[", "]": "\\]"})


def md(text: str) -> str:
    """Escape user text (messages, fixes) so that it renders as written, on one line."""
    return one_line(text).translate(_ESCAPE)


def code(text: str) -> str:
    """An inline code span that survives backticks inside `text`."""
    text = one_line(text)
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _metric(q: QuantizerReport, key: str, pct: bool = False) -> str:
    v = q.metrics.get(key)
    if v is None:
        return "–"
    return fmt_pct(v) if pct else fmt_num(v)


class MarkdownFormat(Format):
    """Report as GitHub-flavoured markdown."""

    name = "markdown"
    suffix = ".md"
    result = "report"

    def render(self, report: Report) -> str:
        """Render `report` as markdown (title, quantizer table, numbered findings, errors)."""
        out: list[str] = []
        d = report.diagnosis
        title = f"## vqdoctor: {report.verdict}"
        if d is not None:
            title += f" — {d.id} ({d.code})"
        out += [title, "", f"**{md(verdict_line(report))}**", ""]
        version = f" · vqdoctor {report.tool_version}" if report.tool_version else ""
        out += [f"Source: {md(' · '.join(source_parts(report)))}{version}", ""]
        if report.quantizers:
            out += self._quantizers(report.quantizers)
        if report.findings:
            out += ["### Findings (most likely root cause first)", ""]
            for i, f in enumerate(report.findings, 1):
                out += self._finding(i, f)
            out.append("")
        if report.errors:
            out += ["### Errors (the analysis is incomplete)", ""]
            out += [f"- {code(error_label(e))}: {md(str(e.get('message', '')))}"
                    for e in report.errors]
            out.append("")
        if wants_probe_hint(report):
            out += [f"_Note: {md(PROBE_HINT)}._", ""]
        while out and out[-1] == "":
            out.pop()
        return "\n".join(out) + "\n"

    def _quantizers(self, quantizers: list[QuantizerReport]) -> list[str]:
        rows = ["### Quantizers", "",
                "| quantizer | kind | library | K | D | perplexity | used | dead | code norm "
                "| scale ratio | usage |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
        for q in quantizers:
            spark, caption = histogram_summary(q)
            usage = f"{code(spark)} {md(caption)}" if spark else md(caption)
            cells = [code(display_name(q.name)), md(str(q.info.get("kind", ""))),
                     md(str(q.info.get("library", ""))),
                     fmt_num(q.info.get("codebook_size")), fmt_num(q.info.get("dim")),
                     _metric(q, "perplexity"), _metric(q, "usage_fraction", pct=True),
                     _metric(q, "dead_fraction", pct=True), _metric(q, "code_norm_median"),
                     _metric(q, "scale_ratio"), usage]
            rows.append("| " + " | ".join(cells) + " |")
        notes = [(display_name(q.name), n) for q in quantizers for n in q.notes]
        notes += [(display_name(q.name), "reference: " + reference_line(q)) for q in quantizers
                  if q.reference]
        rows.append("")
        if notes:
            rows += [f"- {code(name)}: {md(n)}" for name, n in notes]
            rows.append("")
        return rows

    def _finding(self, i: int, f: Finding) -> list[str]:
        head = (f"{i}. **{f.code} {code(f.id)}** — {f.severity}, confidence "
                f"{f.confidence:.2f} — {code(location(f))}: {md(f.message)}")
        out = [head]
        if f.caused_by:
            out.append(f"   - caused by: {code(f.caused_by)}")
        if f.evidence:
            ev = ", ".join(code(f"{k}={fmt_value(v)}") for k, v in f.evidence.items())
            out.append(f"   - evidence: {ev}")
        if f.fix:
            out.append(f"   - fix: {md(f.fix)}")
        return out


# ============================================================================ gate result

ICON = {Status.PASS: "✅ pass", Status.FAIL: "❌ fail", Status.SKIP: "⏭️ skip"}
OUTCOME_ICON = {"pass": "✅", "fail": "❌", "incomplete": "⚠️"}


class MarkdownGateFormat(Format):
    """Gate result as GitHub-flavoured markdown."""

    name = "markdown"
    suffix = ".md"
    result = "gate"

    def render(self, result: GateResult) -> str:
        """Render `result`: title, target, checks table, top findings, notes."""
        out = [f"## {OUTCOME_ICON[result.outcome]} vqdoctor gate {OUTCOME_TITLE[result.outcome]}",
               "", f"**{md(result.summary_line())}**", "",
               f"Target: {md(target_line(result))}", ""]
        out += ["| status | quantizer | check | measured | threshold | detail |",
                "|---|---|---|--:|--:|---|"]
        for c in result.checks:
            detail = md(c.message) + (f" · {code(c.metric)}, {md(c.source)}" if c.source else "")
            out.append(f"| {ICON[c.status]} | {code(c.subject)} | {c.name} | "
                       f"{md(measured(c)) if c.status is not Status.SKIP else '–'} | "
                       f"{md(threshold(c))} | {detail} |")
        out.append("")
        findings = top_findings(result)
        if findings:
            out += ["### Top findings (most likely root cause first)", ""]
            for i, f in enumerate(findings, 1):
                out.append(f"{i}. **{f.code} {code(f.id)}** — {f.severity} — "
                           f"{code(location(f))}: {md(f.message)}")
                if f.caused_by:
                    out.append(f"   - caused by: {code(f.caused_by)}")
                if f.fix:
                    out.append(f"   - fix: {md(f.fix)}")
            out.append("")
        for p in result.problems:
            out.append(f"- could not analyse: {md(p)}")
        for n in result.notes:
            out.append(f"- note: {md(n)}")
        while out and out[-1] == "":
            out.pop()
        return "\n".join(out) + "\n"
