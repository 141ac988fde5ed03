"""`vqdoctor watch [OPTIONS] -- CMD ARGS...` and `vqdoctor watch RUN_DIR`.

With a command: run it unmodified with vqdoctor's hooks attached in its Python processes
(`vqdoctor.live.launcher`), show the live panel while it runs, then print the ranked report.
The exit code is the command's own when it failed; otherwise 1 when the report has a finding at
or above `--fail-on` (default `never`: the command's exit code is passed through), 2 when
vqdoctor itself could not work.

With a run directory: show the live panel over a run recorded elsewhere (the Python API, another
process) until it finishes (or Ctrl-C), then print its report.

Options go before the command or run directory (everything after the first positional argument
belongs to the command), so `vqdoctor watch python train.py --lr 3e-4` works; `--` makes it
explicit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from vqdoctor.cli.boundary import EXIT_ERROR, EXIT_OK, boundary, print_warning
from vqdoctor.cli.inspect import thresholds_from
from vqdoctor.cli.options import FailOn, FailOnOption, FormatOption, OutputOption, ReportFormat
from vqdoctor.cli.output import (
    err_console,
    info,
    render_and_exit_code,
)
from vqdoctor.errors import InputError

if TYPE_CHECKING:
    pass

RAW_ARGS = "vqdoctor.raw_args"
WATCH_CONTEXT = {"allow_interspersed_args": False}


class RawArgsCommand(TyperCommand):
    """A Typer command that keeps its raw arguments in `ctx.meta` (to see whether `--` was given)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS] = list(args)
        return super().parse_args(ctx, self._run_dir_last(args))

    def _run_dir_last(self, args: list[str]) -> list[str]:
        """`watch RUN_DIR --format json`: options after a run directory are options too (a
        command's options are not: everything after a command belongs to it)."""
        takes_value = {o for p in self.params if getattr(p, "opts", None) and not getattr(p, "is_flag", False)
                       and p.param_type_name == "option" for o in p.opts}
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                return args
            if a.startswith("-"):
                i += 2 if a in takes_value else 1
                continue
            if Path(a).is_dir() and not any(x == "--" for x in args[i + 1:]):
                return [*args[:i], *args[i + 1:], a]
            return args
        return args


def split_command(ctx: typer.Context, positionals: list[str]) -> tuple[list[str], list[str] | None]:
    """(arguments before `--`, the command after it or None) from the raw command line."""
    raw = ctx.meta.get(RAW_ARGS)
    if raw is None or "--" not in raw:
        return positionals, None
    after = raw[raw.index("--") + 1:]
    n = len(after)
    if n <= len(positionals) and positionals[len(positionals) - n:] == after:
        return positionals[: len(positionals) - n], after
    return positionals, None


def _panel_mode(no_panel: bool) -> str:
    return "lines" if no_panel else "auto"


@boundary
def watch(
    ctx: typer.Context,
    args: Annotated[list[str] | None, typer.Argument(
        metavar="RUN_DIR | -- CMD ARGS", show_default=False,
        help="A training command to run watched (after --), or a run directory to follow.")
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", readable=False, metavar="DIR", file_okay=False,
        help="Where to record the run (default: a new folder under ./vqdoctor-runs/).")] = None,
    flush_every: Annotated[int, typer.Option(
        "--flush-every", metavar="N", min=1,
        help="Steps between two copies of the statistics to the host (and to disk).")] = 50,
    stats_every: Annotated[int, typer.Option(
        "--stats-every", metavar="N", min=1,
        help="Steps between two cadence statistics (scale, drift, gradients).")] = 10,
    window: Annotated[int | None, typer.Option(
        "--window", metavar="N", min=1,
        help="Steps of the windowed usage metrics (default: automatic).")] = None,
    fmt: FormatOption = ReportFormat.text,
    output: OutputOption = None,
    fail_on: FailOnOption = FailOn.never,
    no_panel: Annotated[bool, typer.Option(
        "--no-panel", help="Plain status lines on stderr instead of the live panel.")] = False,
    threshold: Annotated[list[str] | None, typer.Option(
        "--threshold", metavar="RULE.NAME=VALUE",
        help="Override a rule threshold (repeatable), as in inspect.")] = None,
    tensorboard: Annotated[Path | None, typer.Option(
        "--tensorboard", readable=False, metavar="DIR", file_okay=False,
        help="Also write the metrics to TensorBoard event files in DIR (needs tensorboard).")] = None,
    wandb: Annotated[bool, typer.Option(
        "--wandb", help="Also log the metrics to Weights & Biases: the script's run, else a new "
                        "one in $WANDB_PROJECT (needs wandb).")] = False,
) -> None:
    """Run a training command watched (live panel, ranked report), or follow a run directory.

    Exit: the command's own code when it fails; else 1 when a finding is at or above --fail-on (default never), 0 otherwise; 2 when vqdoctor could not work.
    """
    before, command = split_command(ctx, list(args or []))
    thresholds = thresholds_from(threshold or []) or None
    if command is not None:
        if before:
            raise InputError(f"unexpected argument(s) before --: {' '.join(before)}",
                             hint="vqdoctor watch [OPTIONS] -- CMD ARGS...")
        if not command:
            raise InputError("no command after --", hint="vqdoctor watch -- python train.py")
        code = watch_command(command, run_dir=run_dir, flush_every=flush_every,
                             stats_every=stats_every, window=window, fmt=fmt, output=output,
                             fail_on=fail_on.value, panel=_panel_mode(no_panel),
                             thresholds=thresholds, tensorboard=tensorboard, wandb=wandb)
    else:
        if not before:
            raise InputError("nothing to watch",
                             hint="vqdoctor watch -- python train.py, or vqdoctor watch RUN_DIR")
        first = Path(before[0])
        if len(before) == 1 and first.is_dir():
            if run_dir is not None:
                raise InputError("--run-dir applies to a command; RUN_DIR is already given")
            if tensorboard is not None or wandb:
                raise InputError("--tensorboard and --wandb apply to a command the watch runs")
            code = watch_run_dir(first, fmt=fmt, output=output, fail_on=fail_on.value,
                                 panel=_panel_mode(no_panel), thresholds=thresholds)
        elif len(before) == 1 and not first.exists() and shutil.which(before[0]) is None:
            raise InputError("no such run directory or command", path=before[0],
                             hint="a command goes after --: vqdoctor watch -- CMD ARGS...")
        elif len(before) == 1 and first.is_file() and shutil.which(before[0]) is None:
            raise InputError("not a run directory (a file)", path=before[0],
                             hint="pass the folder that holds meta.json and rank*.jsonl, or a "
                                  "command after --: vqdoctor watch -- python SCRIPT")
        elif first.is_dir():
            raise InputError("options go before RUN_DIR", path=before[0],
                             hint="vqdoctor watch [OPTIONS] RUN_DIR")
        else:
            code = watch_command(before, run_dir=run_dir, flush_every=flush_every,
                                 stats_every=stats_every, window=window, fmt=fmt, output=output,
                                 fail_on=fail_on.value, panel=_panel_mode(no_panel),
                                 thresholds=thresholds, tensorboard=tensorboard, wandb=wandb)
    if code != EXIT_OK:
        raise typer.Exit(code)


def watch_command(command: list[str], *, run_dir: Path | None, flush_every: int, stats_every: int,
                  window: int | None, fmt: ReportFormat, output: Path | None, fail_on: str,
                  panel: str, thresholds: dict[str, dict[str, Any]] | None,
                  tensorboard: Path | None = None, wandb: bool = False) -> int:
    """Run the command watched, print its report; the exit code (see the module docstring)."""
    from vqdoctor.cli.panel import display_for
    from vqdoctor.live.launcher import run_watched

    run = run_watched(command, run_dir, flush_every=flush_every, stats_every=stats_every,
                      window=window, display=display_for(panel, err_console()), thresholds=thresholds,
                      tensorboard=tensorboard, wandb=wandb)
    info(f"vqdoctor: run recorded in {run.run_dir}", style="dim")
    if run.exit_code != 0:
        print_warning(f"the command exited with status {run.exit_code}")
    if run.report is None:
        print_warning(run.note or "nothing was recorded")
        if run.exit_code != 0:
            return run.exit_code
        return EXIT_OK if fail_on == "never" else EXIT_ERROR
    code = render_and_exit_code(run.report, fmt, output, fail_on)
    if run.exit_code != 0:
        return run.exit_code
    # --fail-on never (the default here): the command's own status is the exit code
    return EXIT_OK if fail_on == "never" else code


def watch_run_dir(run_dir: Path, *, fmt: ReportFormat, output: Path | None, fail_on: str,
                  panel: str, thresholds: dict[str, dict[str, Any]] | None) -> int:
    """Follow a run recorded elsewhere until it ends (or Ctrl-C), then print its report."""
    from vqdoctor.cli.panel import follow_run
    from vqdoctor.diagnosis import report_run
    from vqdoctor.live.store import load_records, writer_gone

    load_records(run_dir)  # a missing directory, or one that holds no run: one line, exit 2
    try:
        follow_run(run_dir, mode=panel, console=err_console(), thresholds=thresholds,
                   title=str(run_dir), stop=writer_gone(run_dir))
    except KeyboardInterrupt:
        info("vqdoctor: stopped following; the report covers the records so far", style="dim")
    report = report_run(run_dir, thresholds)
    return render_and_exit_code(report, fmt, output, fail_on)


__all__ = ["RAW_ARGS", "WATCH_CONTEXT", "RawArgsCommand", "split_command",
           "watch", "watch_command", "watch_run_dir"]
