"""Report output formats: one small class per format behind one interface (`Format`).

    render(report, "text", width=80, color=False)   # -> str

`FORMATS` maps a `--format` value to its class; add a format by adding a module with a
`Format` subclass and an entry here (junit and github come with the gate command).
"""

from __future__ import annotations

from vqdoctor.errors import ConfigError
from vqdoctor.report.formats.base import DEFAULT_WIDTH, Format
from vqdoctor.report.formats.json import JsonFormat
from vqdoctor.report.formats.markdown import MarkdownFormat
from vqdoctor.report.formats.text import TextFormat
from vqdoctor.report.model import Report

FORMATS: dict[str, type[Format]] = {
    "text": TextFormat,
    "json": JsonFormat,
    "markdown": MarkdownFormat,
}


def get_format(fmt: str, *, width: int | None = None, color: bool | None = None) -> Format:
    """An instance of the format named `fmt`.

    Raises:
        ConfigError: `fmt` is not a known format.
    """
    try:
        cls = FORMATS[fmt]
    except KeyError:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}") from None
    return cls(width=width, color=color)


def render(report: Report, fmt: str = "text", *, width: int | None = None,
           color: bool | None = None) -> str:
    """Render `report` in format `fmt`.

    Args:
        report: the report.
        fmt: a key of `FORMATS`.
        width: line width for laid-out formats (default 80).
        color: terminal colours for formats that have them (default off).

    Returns:
        The rendered report, ending with one newline.

    Raises:
        ConfigError: unknown format.
    """
    return get_format(fmt, width=width, color=color).render(report)


__all__ = ["DEFAULT_WIDTH", "FORMATS", "Format", "JsonFormat", "MarkdownFormat", "TextFormat",
           "get_format", "render"]
