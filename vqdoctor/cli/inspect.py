"""`vqdoctor inspect PATH...`: diagnose checkpoints with no training code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vqdoctor.cli.boundary import EXIT_OK, boundary, print_warning
from vqdoctor.cli.options import FailOn, FailOnOption, FormatOption, OutputOption, ReportFormat
from vqdoctor.cli.output import (
    err_console,
    render_and_exit_code,
)

if TYPE_CHECKING:
    from vqdoctor.results.model import Report

TRUST_WARNING = (
    "--trust-checkpoint: checkpoints will be fully unpickled, which runs any code they contain. "
    "Use it only on files you created or trust.")


def parse_levels(text: str | None) -> list[int] | None:
    """`8,5,5` -> [8, 5, 5] (FSQ levels, each >= 2)."""
    if text is None:
        return None
    try:
        levels = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        levels = []
    if not levels or any(x < 2 for x in levels):
        raise typer.BadParameter(f"expected integers >= 2 separated by commas, e.g. 8,5,5; "
                                 f"got {text!r}", param_hint="'--levels'")
    return levels


def parse_memory(text: str | None) -> int | None:
    """`--max-memory 4GiB` -> bytes (None: the library default)."""
    if text is None:
        return None
    from vqdoctor.checkpoint.limits import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--max-memory'") from None


def thresholds_from(options: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Thresholds from pyproject.toml, overridden by `--threshold` options, checked and typed."""
    from vqdoctor.config import load_config, parse_threshold_options, resolve_thresholds

    config = load_config()
    for note in config.notes:
        print_warning(note)
    cli = parse_threshold_options(options)
    if not config.thresholds and not cli:
        return {}
    return resolve_thresholds([config.thresholds, cli])


def run_inspect(paths: Sequence[Path], **kwargs: Any) -> Report:
    """The library call (a seam for tests)."""
    from vqdoctor.diagnosis import inspect_checkpoints

    return inspect_checkpoints(list(paths), **kwargs)


@boundary
def inspect(
    paths: Annotated[list[Path], typer.Argument(
        readable=False, metavar="PATH", show_default=False,
        help="Checkpoint file(s) or folder(s). Several = one run, oldest first (drift).")],
    probe: Annotated[Path | None, typer.Option(
        "--probe", readable=False, metavar="FILE[:KEY]",
        help="Tensor file of encoder outputs (the quantizer's input), or a dict name -> tensor; "
             "FILE:KEY takes one entry of a dict.")
    ] = None,
    quantizer: Annotated[list[str] | None, typer.Option(
        "--quantizer", metavar="PREFIX",
        help="Key prefix of a quantizer to use (repeatable), when discovery needs help.")] = None,
    levels: Annotated[str | None, typer.Option(
        "--levels", metavar="8,5,5", help="FSQ levels (nothing of them is stored).")] = None,
    fmt: FormatOption = ReportFormat.text,
    output: OutputOption = None,
    fail_on: FailOnOption = FailOn.error,
    trust_checkpoint: Annotated[bool, typer.Option(
        "--trust-checkpoint",
        help="Allow full unpickling. Runs code from the file: only for files you trust.")
    ] = False,
    threshold: Annotated[list[str] | None, typer.Option(
        "--threshold", metavar="RULE.NAME=VALUE",
        help="Override a rule threshold (repeatable), e.g. dead-codes.warn_fraction=0.3; also "
             "read from pyproject.toml (tool.vqdoctor.thresholds).")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", metavar="SIZE",
        help="Memory budget for reading any one input tensor, e.g. 4GiB (default 1GiB): larger "
             "checkpoint tensors are refused, larger probes sampled; data that expands from far "
             "fewer stored bytes (stride-0 views, deflated members) gets 1/16 of it.")] = None,
) -> None:
    """Diagnose checkpoint(s): a ranked list of why the codebook collapses.

    Exit 0 when nothing is at or above --fail-on, 1 when something is, 2 when the input could not be analysed.
    """
    if trust_checkpoint:
        print_warning(TRUST_WARNING)
    level_list = parse_levels(levels)
    budget = parse_memory(max_memory)
    thresholds = thresholds_from(threshold or [])
    kwargs: dict[str, Any] = {"probe": probe, "quantizers": quantizer or None,
                              "levels": level_list, "trust_checkpoint": trust_checkpoint,
                              "thresholds": thresholds or None}
    if budget is not None:
        kwargs["max_memory"] = budget
    err = err_console()
    if err.is_terminal:
        with err.status(f"reading {len(paths)} checkpoint{'s' * (len(paths) != 1)} ..."):
            report = run_inspect(paths, **kwargs)
    else:
        report = run_inspect(paths, **kwargs)

    code = render_and_exit_code(report, fmt, output, fail_on.value)
    if code != EXIT_OK:
        raise typer.Exit(code)


__all__ = ["inspect", "parse_levels", "parse_memory", "run_inspect", "thresholds_from"]
