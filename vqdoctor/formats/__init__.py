"""Output formats for reports and gate results: one registry, one entry point.

    from vqdoctor.formats import format
    format(report, "text", width=80, color=False)   # a vqdoctor.results.Report
    format(gate_result, "junit")                     # a vqdoctor.gate.GateResult

`format` dispatches on the type of the result; each format is one small class (a
`vqdoctor.formats.base.Format`) registered under its `--format` name for the kind of result it
renders. Reports: text, json, markdown, html. Gate results: text, json, junit, github, markdown,
html. Numbers are formatted by `vqdoctor.numbers` everywhere (reports, gate, panel).
No format reads files, prints or imports torch.
"""

from __future__ import annotations

from typing import Any

from vqdoctor.errors import ConfigError
from vqdoctor.formats.base import DEFAULT_WIDTH, Format
from vqdoctor.formats.github import GithubFormat
from vqdoctor.formats.html import HtmlFormat, HtmlGateFormat
from vqdoctor.formats.json import JsonFormat, JsonGateFormat
from vqdoctor.formats.junit import JunitFormat
from vqdoctor.formats.markdown import MarkdownFormat, MarkdownGateFormat
from vqdoctor.formats.text import TextFormat, TextGateFormat

_ALL: tuple[type[Format], ...] = (
    TextFormat, JsonFormat, MarkdownFormat, HtmlFormat,
    TextGateFormat, JsonGateFormat, JunitFormat, GithubFormat, MarkdownGateFormat, HtmlGateFormat,
)

REGISTRY: dict[str, dict[str, type[Format]]] = {}
"""result kind ("report" | "gate") -> format name -> format class."""
for _cls in _ALL:
    REGISTRY.setdefault(_cls.result, {})[_cls.name] = _cls

FORMATS: dict[str, type[Format]] = REGISTRY["report"]
"""The report formats by name."""
GATE_FORMATS: dict[str, type[Format]] = REGISTRY["gate"]
"""The gate result formats by name."""


def result_kind(result: Any) -> str:
    """"report" for a `Report`, "gate" for a `GateResult`.

    Raises:
        ConfigError: anything else.
    """
    from vqdoctor.gate import GateResult
    from vqdoctor.results.model import Report

    if isinstance(result, GateResult):
        return "gate"
    if isinstance(result, Report):
        return "report"
    raise ConfigError(f"cannot format a {type(result).__name__}: expected a Report or a GateResult")


def get_format(kind: str, fmt: str, *, width: int | None = None,
               color: bool | None = None) -> Format:
    """An instance of the format `fmt` for results of `kind` ("report" or "gate").

    Raises:
        ConfigError: `fmt` is not a format of that kind.
    """
    known = REGISTRY.get(kind, {})
    try:
        cls = known[fmt]
    except KeyError:
        what = "format" if kind == "report" else f"{kind} format"
        raise ConfigError(f"unknown {what} {fmt!r}; known: {', '.join(known)}") from None
    return cls(width=width, color=color)


def format(result: Any, fmt: str = "text", *, width: int | None = None,  # noqa: A001
           color: bool | None = None) -> str:
    """Render a report or a gate result in format `fmt`.

    Args:
        result: a `vqdoctor.results.Report` or a `vqdoctor.gate.GateResult`.
        fmt: a format name of that kind of result (`FORMATS` / `GATE_FORMATS`).
        width: line width for laid-out formats (default 80).
        color: terminal colours for formats that have them (default off).

    Returns:
        The rendered result, ending with one newline.

    Raises:
        ConfigError: unknown format, or not a result object.
    """
    return get_format(result_kind(result), fmt, width=width, color=color).render(result)


__all__ = ["DEFAULT_WIDTH", "FORMATS", "GATE_FORMATS", "REGISTRY", "Format", "GithubFormat",
           "HtmlFormat", "HtmlGateFormat", "JsonFormat", "JsonGateFormat", "JunitFormat",
           "MarkdownFormat", "MarkdownGateFormat", "TextFormat", "TextGateFormat", "format",
           "get_format", "result_kind"]
