"""The CLI's one error boundary: every command runs inside `@boundary`.

Exit codes (docs/contract.md#exit-codes): 0 nothing at or above `--fail-on`; 1 findings at or above
it; 2 could not analyse. An uncaught exception in a Typer command would exit 1 and read as
"findings", so the boundary catches everything:

- `VQDoctorError` -> `vqdoctor: error: <one line>` on stderr, exit 2;
- `typer.BadParameter` (usage) -> left to Typer, which prints usage and exits 2;
- `MemoryError` / `RecursionError` -> one line saying the input was too large / too deeply
  nested (the readers bound both before they happen; this is the net under them), exit 2;
- anything else -> `vqdoctor: internal error: <Type>: <msg> (run with --debug ...)`, exit 2.

`--debug` (or `VQDOCTOR_DEBUG=1`) adds the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.text import Text

from vqdoctor.cli.output import err_console
from vqdoctor.errors import VQDoctorError

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}


def set_debug(on: bool) -> None:
    """Record the global `--debug` flag for this invocation."""
    _state["debug"] = bool(on)


def debug_enabled() -> bool:
    """True with `--debug` or `VQDOCTOR_DEBUG` set to a true value."""
    env = os.environ.get("VQDOCTOR_DEBUG", "").strip().lower()
    return _state["debug"] or env in ("1", "true", "yes", "on")


def _one_line(text: str, limit: int = 1000) -> str:
    # The limit guards against runaway exception text; vqdoctor's own messages (a path of up to a
    # few hundred characters, the problem and a hint) must fit whole.
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_error(message: str) -> None:
    """`vqdoctor: error: <message>` on stderr, one line."""
    line = Text("vqdoctor: error: ", style="bold red")
    line.append(_one_line(message))
    err_console().print(line)


def print_warning(message: str) -> None:
    """`vqdoctor: warning: <message>` on stderr, one line."""
    line = Text("vqdoctor: warning: ", style="bold yellow")
    line.append(_one_line(message))
    err_console().print(line)


def internal_error(exc: BaseException) -> None:
    """Report an unexpected exception (with its traceback under `--debug`)."""
    con = err_console()
    if debug_enabled():
        import traceback

        con.print(Text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                       .rstrip()))
        hint = "please report"
    else:
        hint = "run with --debug for the traceback; please report"
    msg = _one_line(str(exc))
    line = Text("vqdoctor: internal error: ", style="bold red")
    line.append(f"{type(exc).__name__}: {msg} ({hint})" if msg else
                f"{type(exc).__name__} ({hint})")
    con.print(line)


def _quiet_broken_pipe() -> None:
    # The reader went away (`vqdoctor ... | head`): stop writing, and keep Python from
    # complaining about the unflushable stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def boundary(fn: F) -> F:
    """Run a command so that every failure becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except VQDoctorError as e:
            if debug_enabled():
                import traceback

                err_console().print(Text("".join(traceback.format_exc()).rstrip()))
            print_error(str(e))
            raise typer.Exit(EXIT_ERROR) from None
        except BrokenPipeError:
            _quiet_broken_pipe()
            raise typer.Exit(EXIT_ERROR) from None
        except (MemoryError, RecursionError) as e:
            if debug_enabled():
                import traceback

                err_console().print(Text("".join(traceback.format_exc()).rstrip()))
            print_error("the input needs more memory than this machine can give (lower what is read, "
                        "e.g. a smaller --max-memory)" if isinstance(e, MemoryError) else
                        "the input is nested too deeply to read (past Python's recursion limit)")
            raise typer.Exit(EXIT_ERROR) from None
        except Exception as e:
            internal_error(e)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def report_exit_code(report: Any, fail_on: str) -> int:
    """Exit code for a finished report: 1 at or above `fail_on`, else 2 if incomplete, else 0.

    Findings win over rule errors (a real problem was found); rule errors alone give 2, since an
    incomplete analysis must never pass as a clean 0.
    """
    if report.exceeds(fail_on):
        return EXIT_FINDINGS
    if report.errors:
        return EXIT_ERROR
    return EXIT_OK
