"""`vqdoctor demo`: train a tiny VQ model that collapses, diagnose it, then the fixed run beside it.

The training lives in `vqdoctor.demo.run_demo`; this command only shows its progress on stderr
and its results on stdout.
"""

from __future__ import annotations

import shlex
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from vqdoctor.cli.boundary import boundary
from vqdoctor.cli.output import err_console, out_console, print_block, report_width, use_color
from vqdoctor.errors import VQDoctorError
from vqdoctor.report.formats.base import fmt_num

if TYPE_CHECKING:
    from collections.abc import Callable

    from vqdoctor.report.model import Report

KEEP_HINT_DIR = "vqdoctor-demo"


def load_run_demo() -> Callable[..., Any]:
    """`vqdoctor.demo.run_demo` (a seam for tests).

    Raises:
        VQDoctorError: the demo module is not part of this installation.
    """
    try:
        from vqdoctor.demo import run_demo
    except ModuleNotFoundError as e:
        if e.name not in ("vqdoctor.demo",):
            raise
        raise VQDoctorError("the demo is not available in this installation "
                            "(vqdoctor.demo is missing)") from e
    return run_demo


def _stat_label(key: str) -> str:
    return key.replace("_", " ")


def comparison(collapsed: Report, healthy: Report, collapsed_stats: dict[str, Any],
               healthy_stats: dict[str, Any]) -> Table:
    """Side-by-side table: verdict, diagnosis and the final training statistics of both runs."""
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    table.add_column("")
    table.add_column("collapsing run", justify="right")
    table.add_column("fixed run", justify="right")
    dc, dh = collapsed.diagnosis, healthy.diagnosis
    table.add_row("verdict", collapsed.verdict, healthy.verdict)
    table.add_row("diagnosis", dc.id if dc else "-", dh.id if dh else "-")
    keys = list(collapsed_stats) + [k for k in healthy_stats if k not in collapsed_stats]
    for k in keys:
        table.add_row(_stat_label(k), fmt_num(collapsed_stats.get(k)),
                      fmt_num(healthy_stats.get(k)))
    return table


@boundary
def demo(
    keep: Annotated[Path | None, typer.Option(
        "--keep", metavar="DIR", file_okay=False,
        help="Keep the demo's checkpoints and run data in DIR (default: a temporary folder).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the demo runs.")] = 0,
) -> None:
    """Train a tiny VQ model that collapses (CPU, < 30 s), diagnose it, then the fixed run."""
    run_demo = load_run_demo()
    out, err = out_console(), err_console()
    width, color = report_width(out), use_color(out)
    from vqdoctor.report.formats import render

    with ExitStack() as stack:
        if keep is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vqdoctor-demo-")))
        else:
            workdir = keep
            workdir.mkdir(parents=True, exist_ok=True)
        status = stack.enter_context(err.status("training ...")) if err.is_terminal else None

        def progress(message: str) -> None:
            if status is not None:
                status.update(message)
            err.print(Text(f"  {message}", style="dim"))

        err.print(Text("vqdoctor demo: training two tiny VQ models on synthetic data (CPU)",
                       style="bold"))
        result = run_demo(workdir, seed=seed, progress=progress)
        if status is not None:
            status.stop()

        print_block(out, Rule("1. the collapsing run", style="red"), width=width)
        out.file.write(render(result.collapsed, "text", width=width, color=color))
        out.print()
        print_block(out, Rule("2. the same model, fixed", style="green"), width=width)
        out.file.write(render(result.healthy, "text", width=width, color=color))
        out.print()
        print_block(out, Rule("side by side"), width=width)
        print_block(out, comparison(result.collapsed, result.healthy,
                                    dict(getattr(result, "collapsed_stats", {}) or {}),
                                    dict(getattr(result, "healthy_stats", {}) or {})),
                    width=width)
        out.print()
        checkpoints: dict[str, Path] = dict(getattr(result, "checkpoints", {}) or {})
        if checkpoints:
            out.print(Text("Inspect the saved checkpoints yourself:", style="bold"))
            if keep is None:
                out.print(Text(f"  vqdoctor demo --seed {seed} --keep {KEEP_HINT_DIR}"))
            def shown(path: Path) -> str:
                p = (Path(KEEP_HINT_DIR) / Path(path).resolve().relative_to(workdir.resolve())
                     if keep is None and _inside(Path(path), workdir) else Path(path))
                return shlex.quote(str(p))

            for run in ("collapsed", "healthy"):
                if run not in checkpoints:
                    continue
                early = checkpoints.get(f"{run}_early")
                paths = " ".join(shown(p) for p in (early, checkpoints[run]) if p is not None)
                probe = checkpoints.get(f"{run}_probe")
                probe_opt = f" --probe {shown(probe)}" if probe is not None else ""
                out.print(Text(f"  vqdoctor inspect {paths}{probe_opt}"))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


__all__ = ["comparison", "demo", "load_run_demo"]
