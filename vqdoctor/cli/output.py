"""Consoles and output plumbing: the report goes to stdout (or `--output`), messages to stderr."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from vqdoctor.errors import InputError

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
