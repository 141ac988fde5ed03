"""The Typer application: global options and the command table."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from vqdoctor import __version__
from vqdoctor.cli import demo as demo_cmd
from vqdoctor.cli import gate as gate_cmd
from vqdoctor.cli import inspect as inspect_cmd
from vqdoctor.cli import report as report_cmd
from vqdoctor.cli import rules as rules_cmd
from vqdoctor.cli import watch as watch_cmd
from vqdoctor.cli.boundary import EXIT_ERROR, boundary, internal_error, set_debug
from vqdoctor.cli.output import out_console

app = typer.Typer(
    name="vqdoctor",
    help="Tells you why your VQ codebook is collapsing: a ranked diagnosis with evidence and "
         "fixes.\n\nExit codes: 0 nothing at or above --fail-on, 1 findings, 2 could not analyse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # the boundary reports errors; never dump locals
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        out_console().print(f"vqdoctor {__version__}")
        raise typer.Exit()


@app.callback()
@boundary
def root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="VQDOCTOR_DEBUG",
        help="Print tracebacks of errors (also VQDOCTOR_DEBUG=1).")] = False,
) -> None:
    """Tells you why your VQ codebook is collapsing."""
    set_debug(debug)


# The command table, in the order of docs/contract.md#commands; each command lives in its own
# module.
app.command("demo")(demo_cmd.demo)
app.command("inspect")(inspect_cmd.inspect)
app.command("watch", cls=watch_cmd.RawArgsCommand,
            context_settings=watch_cmd.WATCH_CONTEXT)(watch_cmd.watch)
app.command("report")(report_cmd.report)
app.command("gate", cls=watch_cmd.RawArgsCommand)(gate_cmd.gate)
app.command("rules")(rules_cmd.rules)


def main() -> None:
    """Console-script entry point: run the app; nothing escapes as a traceback or exit 1."""
    try:
        app(prog_name="vqdoctor")
    except Exception as e:  # raised outside a command's boundary (e.g. while parsing)
        internal_error(e)
        sys.exit(EXIT_ERROR)
