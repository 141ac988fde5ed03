"""`vqdoctor gate TARGET` / `vqdoctor gate -- CMD`: a CI gate over a run directory, checkpoint(s),
or a training command run watched first (`vqdoctor.live.launcher.run_watched`).

Exit 0 when every check passes, 1 when one fails, 2 when the target could not be analysed
(never 1). Thresholds: command line > `[tool.vqdoctor.gate]` in ./pyproject.toml > defaults.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vqdoctor.cli.boundary import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK, boundary, print_warning
from vqdoctor.cli.inspect import TRUST_WARNING
from vqdoctor.cli.options import FailOn, OutputOption
from vqdoctor.cli.output import (
    err_console,
    info,
    out_console,
    report_width,
    summary,
    to_stdout,
    use_color,
    write_report,
)
from vqdoctor.errors import ConfigError, InputError, VQDoctorError

if TYPE_CHECKING:
    from vqdoctor.gate import GateResult, GateThresholds

SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
SUMMARY_LIMIT = 1024 * 1024 - 1024  # GitHub caps a step summary at 1 MiB; leave room for others
EXIT_CODES = {"pass": EXIT_OK, "fail": EXIT_FINDINGS, "incomplete": EXIT_ERROR}
VERDICT = {"pass": "healthy", "fail": "failing", "incomplete": "warning"}


class GateFormatChoice(str, Enum):
    """`--format` values of `vqdoctor gate` (keys of `vqdoctor.formats.GATE_FORMATS`)."""

    text = "text"
    json = "json"
    junit = "junit"
    github = "github"
    markdown = "markdown"
    html = "html"


def run_gate(targets: list[Path], thresholds: GateThresholds, **kwargs: Any) -> GateResult:
    """The library call (a seam for tests)."""
    from vqdoctor.gate import gate

    return gate(targets, thresholds, **kwargs)


def resolve(cli: dict[str, Any]) -> tuple[GateThresholds, dict[str, dict[str, Any]] | None]:
    """Gate thresholds (CLI > pyproject > defaults) and the rule thresholds of pyproject."""
    from vqdoctor.config import load_config
    from vqdoctor.config import resolve_thresholds as resolve_rules
    from vqdoctor.gate import resolve_thresholds

    config = load_config()
    for note in config.notes:
        print_warning(note)
    try:
        thresholds = resolve_thresholds(cli, config.gate)
    except ConfigError as e:
        raise ConfigError(e.message, path=str(config.path) if config.path else None) from None
    rules = resolve_rules([config.thresholds]) if config.thresholds else None
    return thresholds, rules


def append_step_summary(markdown: str) -> None:
    """Append the markdown summary to `$GITHUB_STEP_SUMMARY` when it is set (warn if it fails)."""
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    if len(markdown.encode("utf-8")) > SUMMARY_LIMIT:
        cut = markdown.encode("utf-8")[: SUMMARY_LIMIT - 200].decode("utf-8", errors="ignore")
        markdown = cut.rsplit("\n", 1)[0] + "\n\n_(truncated: GitHub keeps 1 MiB per step)_\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(markdown + "\n")
    except OSError as e:
        print_warning(f"cannot append the job summary to ${SUMMARY_ENV} ({path}): "
                      f"{e.strerror or e}")


def split_targets(ctx: typer.Context, positionals: list[Path]) -> tuple[list[Path], list[str] | None]:
    """(targets, the command after `--` or None), from the raw command line."""
    from vqdoctor.cli.watch import RAW_ARGS

    raw = ctx.meta.get(RAW_ARGS)
    if raw is None or "--" not in raw:
        return positionals, None
    command = list(raw[raw.index("--") + 1:])
    keep = max(0, len(positionals) - len(command))
    return positionals[:keep], command


def watched_run(command: list[str], run_dir: Path | None, probe: Path | None,
                rules: dict[str, dict[str, Any]] | None, kwargs: dict[str, Any]) -> Path:
    """Run the training watched (panel on stderr); its run directory. Records the command and
    its exit status in `kwargs` for the gate's `training` check."""
    from vqdoctor.cli.panel import display_for
    from vqdoctor.live.launcher import run_watched

    if not command:
        raise InputError("no command after --", hint="vqdoctor gate -- python train.py")
    if probe is not None:
        raise InputError("--probe applies to checkpoints; a watched run records usage itself")
    run = run_watched(command, run_dir, display=display_for(console=err_console()), thresholds=rules)
    info(f"vqdoctor: run recorded in {run.run_dir}", style="dim")
    kwargs.update(command=list(run.command), exit_code=run.exit_code)
    return run.run_dir


@boundary
def gate(
    ctx: typer.Context,
    targets: Annotated[list[Path] | None, typer.Argument(
        readable=False, metavar="TARGET | -- CMD ARGS", show_default=False,
        help="A run directory (meta.json / rank*.jsonl), or checkpoint file(s) or folder(s) "
             "(several = one run, oldest first); or, after --, a training command to run "
             "watched and gate.")] = None,
    probe: Annotated[Path | None, typer.Option(
        "--probe", readable=False, metavar="FILE",
        help="Checkpoints: tensor file of encoder outputs, measured as a second usage source.")
    ] = None,
    min_perplexity: Annotated[str | None, typer.Option(
        "--min-perplexity", metavar="X",
        help="Perplexity floor: a share of the reachable codes ('5%', the default) or an "
             "absolute number >= 1.")] = None,
    min_usage: Annotated[str | None, typer.Option(
        "--min-usage", metavar="F",
        help="Least share of K used over the window (default 0.25; '25%' also reads).")] = None,
    max_dead_fraction: Annotated[str | None, typer.Option(
        "--max-dead-fraction", metavar="F",
        help="Largest share of K dead (default 0.5).")] = None,
    window: Annotated[int | None, typer.Option(
        "--window", metavar="N", min=1,
        help="Run directories: gate usage over the last N steps (default: the recorded "
             "window).")] = None,
    fail_on: Annotated[FailOn | None, typer.Option(
        "--fail-on", case_sensitive=False, show_default=False,
        help="Findings at or above this severity fail the gate (default: error).")] = None,
    fmt: Annotated[GateFormatChoice, typer.Option(
        "--format", "-f", case_sensitive=False,
        help="Output format; github also appends a markdown summary to $GITHUB_STEP_SUMMARY.")
    ] = GateFormatChoice.text,
    output: OutputOption = None,
    quantizer: Annotated[list[str] | None, typer.Option(
        "--quantizer", metavar="PATTERN",
        help="Gate only quantizers whose name matches this fnmatch pattern (repeatable).")
    ] = None,
    trust_checkpoint: Annotated[bool, typer.Option(
        "--trust-checkpoint",
        help="Allow full unpickling. Runs code from the file: only for files you trust.")
    ] = False,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", readable=False, metavar="DIR", file_okay=False,
        help="With -- CMD: where to record the run (default: a new folder under "
             "./vqdoctor-runs/).")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", metavar="SIZE",
        help="Checkpoints: memory budget for reading any one tensor, e.g. 4GiB (default 1GiB), "
             "as for vqdoctor inspect.")] = None,
) -> None:
    """Gate CI on codebook health: fail on perplexity collapse, dead codes, and findings.

    With -- CMD ARGS, the training runs watched first (as in vqdoctor watch) and its run is gated; a non-zero exit of the training fails the gate.

    Exit 0 when every check passes, 1 when one fails, 2 when the target could not be analysed.
    """
    from vqdoctor.cli.inspect import parse_memory
    from vqdoctor.diagnosis import is_run_dir
    from vqdoctor.formats import GATE_FORMATS
    from vqdoctor.formats import format as render

    targets, command = split_targets(ctx, list(targets or []))
    try:
        if trust_checkpoint:
            print_warning(TRUST_WARNING)
        if command is None and not targets:
            raise InputError("nothing to gate: give a run directory, checkpoint file(s), or -- CMD")
        if command is not None and targets:
            raise InputError("give a TARGET or -- CMD, not both")
        if command is None and run_dir is not None:
            raise InputError("--run-dir applies to -- CMD (a training the gate runs)")
        cli = {"min_perplexity": min_perplexity, "min_usage": min_usage,
               "max_dead_fraction": max_dead_fraction, "window": window,
               "fail_on": fail_on.value if fail_on is not None else None}
        thresholds, rules = resolve(cli)
        if window is not None and command is None and not any(is_run_dir(t) for t in targets):
            raise ConfigError("--window applies to run directories; a checkpoint has no steps "
                              "(drop --window, or gate the run directory)")
        err = err_console()
        kwargs: dict[str, Any] = {"probe": probe, "quantizers": quantizer or None,
                                  "trust_checkpoint": trust_checkpoint, "rule_thresholds": rules,
                                  "max_memory": parse_memory(max_memory)}
        if command is not None:
            targets = [watched_run(command, run_dir, probe, rules, kwargs)]
            result = run_gate(targets, thresholds, **kwargs)
        elif err.is_terminal:
            with err.status("gating ..."):
                result = run_gate(targets, thresholds, **kwargs)
        else:
            result = run_gate(targets, thresholds, **kwargs)
    except VQDoctorError as e:
        # a CI reader should see the failure in its own format too, then exit 2 as always
        doc = GATE_FORMATS[fmt.value]().render_error(str(e))
        if doc is not None:
            write_report(doc, output)
        raise

    out = out_console()
    text = render(result, fmt.value, width=report_width(out) if to_stdout(output) else None,
                  color=to_stdout(output) and use_color(out))
    write_report(text, output)
    if fmt is GateFormatChoice.github:
        append_step_summary(render(result, "markdown"))
    terminal = to_stdout(output) and fmt is GateFormatChoice.text and out.is_terminal
    if not terminal and not (fmt is GateFormatChoice.github and to_stdout(output)):
        summary(result.summary_line(), VERDICT[result.outcome])
    code = EXIT_CODES[result.outcome]
    if code != EXIT_OK:
        raise typer.Exit(code)


__all__ = ["GateFormatChoice", "append_step_summary", "gate", "resolve", "run_gate", "split_targets",
           "watched_run"]
