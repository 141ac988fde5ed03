"""Options shared by several commands (`--format`, `--output`, `--fail-on`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class ReportFormat(str, Enum):
    """`--format` values of report commands (each is a key of `vqdoctor.formats.FORMATS`)."""

    text = "text"
    json = "json"
    markdown = "markdown"
    html = "html"


class FailOn(str, Enum):
    """`--fail-on` values: the lowest severity that makes the exit code 1."""

    error = "error"
    warning = "warning"
    never = "never"


FormatOption = Annotated[ReportFormat, typer.Option(
    "--format", "-f", help="Report format.", case_sensitive=False)]
OutputOption = Annotated[Path | None, typer.Option(
    "--output", "-o", readable=False, metavar="FILE", dir_okay=False,
    help="Write the report to FILE instead of stdout ('-' = stdout).")]
FailOnOption = Annotated[FailOn, typer.Option(
    "--fail-on", case_sensitive=False,
    help="Exit 1 when a finding is at or above this severity.")]
