"""Markdown gate format: for a pull-request comment and `$GITHUB_STEP_SUMMARY`.

The verdict as a title, the target, a table of every check, and the top findings with their
fixes.
"""

from __future__ import annotations

from vqdoctor.gate import GateResult, Status
from vqdoctor.gate_formats.base import (
    OUTCOME_TITLE,
    GateFormat,
    measured,
    target_line,
    threshold,
    top_findings,
)
from vqdoctor.report.formats.base import location
from vqdoctor.report.formats.markdown import code, md

ICON = {Status.PASS: "✅ pass", Status.FAIL: "❌ fail", Status.SKIP: "⏭️ skip"}
OUTCOME_ICON = {"pass": "✅", "fail": "❌", "incomplete": "⚠️"}


class MarkdownGateFormat(GateFormat):
    """Gate result as GitHub-flavoured markdown."""

    name = "markdown"
    suffix = ".md"

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
