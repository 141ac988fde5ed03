"""Consoles and output plumbing: the report goes to stdout (or `--output`), messages to stderr."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from vqdoctor.errors import InputError

if TYPE_CHECKING:
    from vqdoctor.cli.options import ReportFormat
    from vqdoctor.results.model import Report

MIN_WIDTH, MAX_WIDTH, PIPE_WIDTH = 40, 100, 80
VERDICT_STYLE = {"failing": "bold red", "warning": "bold yellow", "healthy": "bold green"}


def out_console() -> Console:
    """The report console on stdout (created per call: stdout may have been swapped)."""
    return Console(highlight=False, emoji=False, markup=False, soft_wrap=True)


def err_console() -> Console:
    """The message console on stderr; lines are never wrapped (one error = one line)."""
    return Console(stderr=True, highlight=False, emoji=False, markup=False, soft_wrap=True)


def report_width(console: Console) -> int:
    """Width to lay a text report out at: the terminal's (40..100 columns), 80 when piped."""
    if not console.is_terminal:
        return PIPE_WIDTH
    return max(MIN_WIDTH, min(console.width, MAX_WIDTH))


def use_color(console: Console) -> bool:
    """Colours only on a terminal, and never with NO_COLOR set (rich reads NO_COLOR)."""
    return console.is_terminal and console.color_system is not None and not console.no_color


def to_stdout(output: Path | None) -> bool:
    """True when the report goes to stdout (no `--output`, or `--output -`)."""
    return output is None or str(output) == "-"


def write_report(text: str, output: Path | None) -> None:
    """Write a rendered report to stdout, or to the file `output` (written only now, whole).

    Raises:
        InputError: the file cannot be written.
    """
    if to_stdout(output):
        stream = out_console().file
        try:
            stream.write(text)
        except UnicodeEncodeError:  # a legacy console encoding: keep the report, lose the glyphs
            enc = getattr(stream, "encoding", None) or "ascii"
            stream.write(text.encode(enc, errors="replace").decode(enc))
        stream.flush()
        return
    assert output is not None
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write the report: {e.strerror or e}", path=str(output)) from e
    info(f"report written to {output}")


def info(message: str, style: str = "") -> None:
    """One line of progress or information on stderr."""
    err_console().print(Text(message, style=style))


def summary(line: str, verdict: str) -> None:
    """The one-line summary on stderr, coloured by verdict on a terminal."""
    err_console().print(Text(line, style=VERDICT_STYLE.get(verdict, "")))


def print_block(console: Console, renderable: object, *, width: int | None = None) -> None:
    """Print a rich renderable (a table, a rule); piped output loses rich's trailing padding."""
    if console.is_terminal:
        console.print(renderable, width=width, soft_wrap=False)
        return
    with console.capture() as cap:
        console.print(renderable, width=width or PIPE_WIDTH, soft_wrap=False)
    lines = [line.rstrip() for line in cap.get().splitlines()]
    console.file.write("\n".join(lines) + "\n")


def render_and_exit_code(report: Report, fmt: ReportFormat, output: Path | None, fail_on: str) -> int:
    """Print the report (stdout or --output), the summary line on stderr; its exit code.

    On a terminal the text report already ends with the summary line, so it is not repeated.
    """
    from vqdoctor.cli.boundary import print_warning, report_exit_code
    from vqdoctor.formats import format as render

    out = out_console()
    text = render(report, fmt.value, width=report_width(out) if to_stdout(output) else None,
                  color=to_stdout(output) and use_color(out))
    write_report(text, output)
    if report.errors:
        n = len(report.errors)
        print_warning(f"{n} check{'s' * (n != 1)} failed; the analysis is incomplete")
    terminal = to_stdout(output) and fmt.value == "text" and out.is_terminal
    if not terminal:
        summary(report.summary_line(), report.verdict)
    return report_exit_code(report, fail_on)
