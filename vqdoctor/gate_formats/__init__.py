"""Gate result formats: one small class per format behind one interface (`GateFormat`).

    render(result, "junit")   # -> str

`text` (terminal, ruff-like), `json` (the gate result with the report under `report`), `junit`
(JUnit XML for CI test reporters), `github` (GitHub Actions workflow commands) and `markdown`
(a pull-request comment / job summary).
"""

from __future__ import annotations

from vqdoctor.errors import ConfigError
from vqdoctor.gate import GateResult
from vqdoctor.gate_formats.base import GateFormat
from vqdoctor.gate_formats.github import GithubFormat
from vqdoctor.gate_formats.json import JsonGateFormat
from vqdoctor.gate_formats.junit import JunitFormat
from vqdoctor.gate_formats.markdown import MarkdownGateFormat
from vqdoctor.gate_formats.text import TextGateFormat

GATE_FORMATS: dict[str, type[GateFormat]] = {
    "text": TextGateFormat,
    "json": JsonGateFormat,
    "junit": JunitFormat,
    "github": GithubFormat,
    "markdown": MarkdownGateFormat,
}


def render(result: GateResult, fmt: str = "text", *, width: int | None = None,
           color: bool | None = None) -> str:
    """Render a gate result in format `fmt` (a key of `GATE_FORMATS`).

    Raises:
        ConfigError: unknown format.
    """
    try:
        cls = GATE_FORMATS[fmt]
    except KeyError:
        raise ConfigError(f"unknown gate format {fmt!r}; known: {', '.join(GATE_FORMATS)}") from None
    return cls(width=width, color=color).render(result)


__all__ = ["GATE_FORMATS", "GateFormat", "GithubFormat", "JsonGateFormat", "JunitFormat",
           "MarkdownGateFormat", "TextGateFormat", "render"]
