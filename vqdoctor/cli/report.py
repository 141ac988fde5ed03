"""`vqdoctor report RUN_DIR`: the ranked diagnosis of a recorded run, offline.

The report is computed from the run directory alone (meta.json and the rank streams), so a run
can be diagnosed again later, after the training process ended or was killed. Exit codes as for
`inspect`: 0 nothing at or above `--fail-on`, 1 findings, 2 could not analyse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vqdoctor.cli.boundary import EXIT_OK, boundary
from vqdoctor.cli.inspect import thresholds_from
from vqdoctor.cli.options import FailOn, FailOnOption, FormatOption, OutputOption, ReportFormat
from vqdoctor.cli.output import render_and_exit_code
from vqdoctor.errors import InputError


@boundary
def report(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False,
        help="A run directory recorded by vqdoctor watch or vqdoctor.watch(...).")],
    fmt: FormatOption = ReportFormat.text,
    output: OutputOption = None,
    fail_on: FailOnOption = FailOn.error,
    threshold: Annotated[list[str] | None, typer.Option(
        "--threshold", metavar="RULE.NAME=VALUE",
        help="Override a rule threshold (repeatable), as in inspect.")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", readable=False, metavar="FILE", dir_okay=False,
        help="Also draw the report's charts into FILE (PNG; needs matplotlib).")] = None,
) -> None:
    """Diagnose a recorded run: a ranked list of why the codebook collapses.

    Exit 0 when nothing is at or above --fail-on, 1 when something is, 2 when the run could not be analysed.
    """
    from vqdoctor.diagnosis import report_run
    from vqdoctor.live.store import load_records

    _, streams = load_records(run_dir)  # missing, or not a run: one line, exit 2
    if not any(streams.values()):
        raise InputError("the run recorded nothing (no records in rank*.jsonl)", path=str(run_dir),
                         hint="did a model holding a quantizer run under the watch?")
    thresholds = thresholds_from(threshold or []) or None
    result = report_run(run_dir, thresholds)
    if plot is not None:
        from vqdoctor.cli.output import info
        from vqdoctor.results.plot import plot_report

        info(f"charts written to {plot_report(result, plot)}")
    code = render_and_exit_code(result, fmt, output, fail_on.value)
    if code != EXIT_OK:
        raise typer.Exit(code)


__all__ = ["report"]
