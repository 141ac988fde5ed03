"""Text formats: ruff-like, for a terminal and CI logs; readable in 80 columns, colour only when asked.

Report (`TextFormat`): a header line (source, format, safe load), one compact block per
quantizer (identity, key metrics, usage sparkline, published reference values), the ranked
findings with symptoms nested under their cause, errors, and the verdict line.

Gate result (`TextGateFormat`): a header (what was gated), one block per quantizer with a line
per check (status, check, measured vs threshold, then the metric and its source), the run-wide
checks, the diagnosis with its fix, notes, and the summary line.

Lines are wrapped here, with hanging indents, so that every line fits `width` whatever the
terminal; with `color=False` the output is plain and deterministic.
"""

from __future__ import annotations

from io import StringIO

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from vqdoctor.formats.base import Format
from vqdoctor.formats.gate_parts import STATUS_LABEL, finding_line, target_line
from vqdoctor.formats.parts import (
    PROBE_HINT,
    display_name,
    error_label,
    histogram_summary,
    identity,
    location,
    metric_items,
    nesting,
    reference_line,
    source_parts,
    verdict_line,
    wants_probe_hint,
)
from vqdoctor.gate import Check, GateResult, Status
from vqdoctor.numbers import fmt_evidence, one_line
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding

SEVERITY_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "blue"}
VERDICT_STYLE = {"failing": "bold red", "warning": "bold yellow", "healthy": "bold green"}
MAX_DEPTH = 4  # deeper cause chains stop indenting further, so lines keep room for text
SEP = " · "


def wrap(text: Text, width: int, *, indent: int = 0, hang: int = 4) -> list[Text]:
    """Word-wrap styled text: first line at `indent`, continuation lines at `indent + hang`.

    Words longer than a line are broken, so no line is ever wider than `width` (for text made
    of single-cell characters).
    """
    plain = text.plain
    lines: list[Text] = []
    pos, first = 0, True
    while True:
        prefix = indent if first else indent + hang
        room = max(8, width - prefix)
        rest = plain[pos:]
        if cell_len(rest) <= room:
            lines.append(Text(" " * prefix) + text[pos:])
            break
        cut = rest.rfind(" ", 0, room + 1)
        if cut <= 0:
            cut = room
        piece = text[pos:pos + cut]
        piece.rstrip()
        lines.append(Text(" " * prefix) + piece)
        pos += cut
        while pos < len(plain) and plain[pos] == " ":
            pos += 1
        first = False
        if pos >= len(plain):
            break
    return lines


def pack(items: list[Text], width: int, *, sep: str = SEP, indent: int = 0,
         hang: int = 2) -> list[Text]:
    """Lay items out on lines, breaking only between items (a label stays with its value)."""
    lines: list[Text] = []
    line: Text | None = None
    for item in items:
        prefix = indent if not lines and line is None else indent + hang
        if line is not None and cell_len(line.plain) + len(sep) + cell_len(item.plain) <= width:
            line.append(sep, style="dim")
            line.append_text(item)
            continue
        if line is not None:
            lines.append(line)
        if prefix + cell_len(item.plain) > width:  # an item longer than a line: word-wrap it
            lines += wrap(item, width, indent=prefix, hang=hang)
            line = None
        else:
            line = Text(" " * prefix) + item
    if line is not None:
        lines.append(line)
    return lines


class TextFormat(Format):
    """Human-readable report for a terminal (rich styles; plain when `color` is off)."""

    name = "text"
    suffix = ".txt"
    result = "report"

    def render(self, report: Report) -> str:
        """Render `report` as terminal text; see the module docstring for the layout."""
        lines: list[Text] = []
        lines += self._header(report)
        for q in report.quantizers:
            lines.append(Text())
            lines += self._quantizer(q)
        if report.findings:
            lines.append(Text())
            lines += self._findings(report.findings)
        if report.errors:
            lines.append(Text())
            lines += self._errors(report.errors)
        lines.append(Text())
        if wants_probe_hint(report):
            lines += wrap(Text("note: " + PROBE_HINT, style="dim"), self.width, hang=6)
        lines += wrap(Text(verdict_line(report), style=VERDICT_STYLE.get(report.verdict, "")),
                      self.width, hang=4)
        return join_lines(lines, self.width, self.color)

    # -- pieces ------------------------------------------------------------------------------

    def _header(self, report: Report) -> list[Text]:
        head = Text("vqdoctor", style="bold")
        if report.tool_version:
            head.append(f" {report.tool_version}")
        parts = [head] + [Text(p, style="bold red" if p.startswith("UNSAFE") else "")
                          for p in source_parts(report)]
        return pack(parts, self.width, hang=4)

    def _quantizer(self, q: QuantizerReport) -> list[Text]:
        info = q.info
        title = [Text(display_name(q.name), style="bold cyan")]
        title += [Text(str(p)) for p in (info.get("kind"), info.get("library"), identity(q)) if p]
        out = pack(title, self.width, sep="  ", hang=4)
        out += pack([Text(s) for s in metric_items(q)], self.width, indent=2, hang=0)
        spark, caption = histogram_summary(q)
        usage = Text("usage ", style="dim")
        if spark:
            usage.append(spark, style="cyan")
            usage.append("  ")
        usage.append(caption, style="" if spark else "dim")
        out += wrap(usage, self.width, indent=2, hang=8)
        ref = reference_line(q)
        if ref:
            out += wrap(Text("reference: " + ref, style="dim"), self.width, indent=2, hang=11)
        for note in q.notes:
            out += wrap(Text("note: " + one_line(note), style="dim"), self.width, indent=2, hang=6)
        return out

    def _findings(self, findings: list[Finding]) -> list[Text]:
        n = len(findings)
        out = [Text(f"{n} finding{'s' * (n != 1)}, most likely root cause first:", style="bold")]
        for f, depth in zip(findings, nesting(findings), strict=True):
            out.append(Text())
            out += self._finding(f, min(depth, MAX_DEPTH))
        return out

    def _finding(self, f: Finding, depth: int) -> list[Text]:
        head = Text()
        if depth:
            head.append(" " * (4 * depth - 3) + "└─ ", style="dim")
        head.append(f.code, style="bold")
        head.append(" ")
        head.append(f.id, style="bold")
        head.append(" ")
        head.append(f"[{f.severity}]", style=SEVERITY_STYLE.get(f.severity, ""))
        head.append(" ")
        head.append(location(f), style="cyan")
        head.append(": ")
        head.append(one_line(f.message))
        body = 4 * depth + 4
        out = wrap(head, self.width, indent=0, hang=body)
        if f.caused_by:
            out += wrap(Text(f"caused by: {f.caused_by}", style="magenta"), self.width, indent=body)
        if f.evidence:
            out += wrap(Text("evidence: " + fmt_evidence(f.evidence), style="dim"), self.width,
                        indent=body, hang=10)
        if f.fix:
            out += wrap(Text("= fix: " + one_line(f.fix), style="green"), self.width,
                        indent=body, hang=7)
        return out

    def _errors(self, errors: list[dict]) -> list[Text]:
        n = len(errors)
        out = [Text(f"{n} error{'s' * (n != 1)} (the analysis is incomplete):", style="bold red")]
        for err in errors:
            line = Text(error_label(err), style="bold")
            line.append(": " + one_line(str(err.get("message", ""))))
            out += wrap(line, self.width, indent=2, hang=4)
        return out


def join_lines(lines: list[Text], width: int, color: bool) -> str:
    """Laid-out lines as one string: plain text, or ANSI colours when `color`."""
    for line in lines:
        line.rstrip()
    if not color:
        return "\n".join(line.plain for line in lines) + "\n"
    buf = StringIO()
    console = Console(file=buf, width=width, color_system="standard", force_terminal=True,
                      no_color=False, legacy_windows=False, emoji=False, markup=False,
                      highlight=False)
    for line in lines:
        console.print(line, soft_wrap=True)
    return buf.getvalue()


# ============================================================================ gate result

STATUS_STYLE = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "dim"}
OUTCOME_STYLE = {"pass": "bold green", "fail": "bold red", "incomplete": "bold yellow"}
NAME_WIDTH = 18  # "max_dead_fraction" + 1


class TextGateFormat(Format):
    """Human-readable gate result (rich styles; plain when `color` is off)."""

    name = "text"
    suffix = ".txt"
    result = "gate"

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
