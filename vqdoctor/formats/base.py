"""The one interface every output format implements (reports and gate results alike).

A format turns a result object into text and nothing else: it never reads or writes files,
never prints and never imports torch (data flows one way: ... -> rules -> report -> format).
Everything a format shows, charts included, is carried by the result object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

DEFAULT_WIDTH = 80


class Format(ABC):
    """An output format: `render(result) -> str`.

    Args:
        width: target line width in columns (formats that lay out text honour it; default 80).
        color: emit terminal colours (only formats meant for a terminal use it; default off).
    """

    name: ClassVar[str]
    """Registry key and `--format` value, e.g. "text"."""
    suffix: ClassVar[str]
    """File name suffix for this format, e.g. ".txt"."""
    result: ClassVar[str]
    """What it renders: "report" (`vqdoctor.results.Report`) or "gate" (`vqdoctor.gate.GateResult`)."""

    def __init__(self, *, width: int | None = None, color: bool | None = None) -> None:
        self.width = int(width) if width else DEFAULT_WIDTH
        self.color = bool(color)

    @abstractmethod
    def render(self, result: Any) -> str:
        """Render `result`; the output ends with exactly one newline."""

    def render_error(self, message: str) -> str | None:
        """A document saying the analysis could not run (`message`), for formats a CI system
        reads (JUnit, GitHub); None for formats meant for people (the error goes to stderr)."""
        return None


__all__ = ["DEFAULT_WIDTH", "Format"]
