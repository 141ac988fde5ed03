"""Text format: ruff-like, for a terminal; readable in 80 columns, colour only when asked.

Layout: a header line (source, format, safe load), one compact block per quantizer (identity,
key metrics, usage sparkline), the ranked findings with symptoms nested under their cause,
errors, and the verdict line. Lines are wrapped here, with hanging indents, so that every line
fits `width` whatever the terminal; with `color=False` the output is plain and deterministic.
"""

from __future__ import annotations

from io import StringIO

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from vqdoctor.report.formats.base import (
    PROBE_HINT,
    Format,
    display_name,
    error_label,
    fmt_evidence,
    histogram_summary,
    identity,
    location,
    metric_items,
    nesting,
    one_line,
    source_parts,
    verdict_line,
    wants_probe_hint,
)
from vqdoctor.report.model import QuantizerReport, Report
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
