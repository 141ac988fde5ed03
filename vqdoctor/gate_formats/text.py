"""Text gate format: ruff-like, for a terminal and CI logs; fits 80 columns.

A header (what was gated), one block per quantizer with a line per check (status, check,
measured vs threshold, then the metric and its source), the run-wide checks, the diagnosis with
its fix, notes, and the summary line. Plain and deterministic unless `color` is on.
"""

from __future__ import annotations

from rich.text import Text

from vqdoctor.gate import Check, GateResult, Status
from vqdoctor.gate_formats.base import STATUS_LABEL, GateFormat, finding_line, target_line
from vqdoctor.report.formats.base import identity, one_line
from vqdoctor.report.formats.text import SEVERITY_STYLE, join_lines, pack, wrap

STATUS_STYLE = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "dim"}
OUTCOME_STYLE = {"pass": "bold green", "fail": "bold red", "incomplete": "bold yellow"}
NAME_WIDTH = 18  # "max_dead_fraction" + 1


class TextGateFormat(GateFormat):
    """Human-readable gate result (rich styles; plain when `color` is off)."""

    name = "text"
    suffix = ".txt"

    def render(self, result: GateResult) -> str:
        """Render `result` as terminal text; see the module docstring for the layout."""
        head = [Text("vqdoctor gate", style="bold")] + [Text(p) for p in
                                                        target_line(result).split(" · ")]
        lines = pack(head, self.width, hang=4)
        infos = {q.name: q for q in result.report.quantizers}
        subject: str | None = "\0"
        for c in result.checks:
            if c.quantizer != subject:
                subject = c.quantizer
                lines.append(Text())
                title = [Text(c.subject, style="bold cyan")]
                q = infos.get(c.quantizer) if c.quantizer is not None else None
                if q is not None:
                    title += [Text(str(p)) for p in (q.info.get("kind"), q.info.get("library"),
                                                     identity(q)) if p]
                lines += pack(title, self.width, sep="  ", hang=4)
            lines += self._check(c)
        d = result.diagnosis
        if d is not None:
            lines.append(Text())
            head = Text("diagnosis: ", style="bold")
            head.append(finding_line(d), style=SEVERITY_STYLE.get(d.severity, ""))
            lines += wrap(head, self.width, hang=4)
            if d.fix:
                lines += wrap(Text("= fix: " + one_line(d.fix), style="green"), self.width,
                              indent=4, hang=7)
        if result.problems or result.notes:
            lines.append(Text())
        for p in result.problems:
            lines += wrap(Text("could not analyse: " + p, style="yellow"), self.width, hang=4)
        for n in result.notes:
            lines += wrap(Text("note: " + n, style="dim"), self.width, hang=6)
        lines.append(Text())
        lines += wrap(Text(result.summary_line(), style=OUTCOME_STYLE[result.outcome]),
                      self.width, hang=4)
        return join_lines(lines, self.width, self.color)

    def _check(self, c: Check) -> list[Text]:
        line = Text("  ")
        line.append(f"{STATUS_LABEL[c.status]:<5}", style=STATUS_STYLE[c.status])
        line.append(f"{c.name:<{NAME_WIDTH}}", style="bold" if c.status is Status.FAIL else "")
        line.append(one_line(c.message))
        indent = 2 + 5 + NAME_WIDTH
        out = wrap(line, self.width, hang=indent)
        if c.detail:
            out += wrap(Text(c.detail, style="dim"), self.width, indent=indent, hang=2)
        return out
