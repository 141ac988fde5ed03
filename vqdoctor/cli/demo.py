"""`vqdoctor demo`: train a tiny VQ model that collapses, diagnose it, then the fixed run beside it.

The training lives in `vqdoctor.demo.run_demo`; this command only shows its progress on stderr
and its results on stdout.
"""

from __future__ import annotations

import inspect
import shlex
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from vqdoctor.cli.boundary import boundary
from vqdoctor.cli.output import err_console, out_console, print_block, report_width, use_color
from vqdoctor.errors import VQDoctorError
from vqdoctor.numbers import fmt_num

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from rich.console import Console

    from vqdoctor.results.model import Report

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
               healthy_stats: dict[str, Any], collapsed_run: Report | None = None,
               healthy_run: Report | None = None) -> Table:
    """Side-by-side table: verdict, diagnosis and the final training statistics of both runs
    (with the live watch's diagnosis and the step it first held, when the runs were watched)."""
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    table.add_column("")
    table.add_column("collapsing run", justify="right")
    table.add_column("fixed run", justify="right")
    if collapsed_run is not None and healthy_run is not None:
        rc, rh = collapsed_run.diagnosis, healthy_run.diagnosis
        table.add_row("watch verdict", collapsed_run.verdict, healthy_run.verdict)
        table.add_row("watch diagnosis", rc.id if rc else "-", rh.id if rh else "-")
        table.add_row("first alert @step", fmt_num(_first_step(collapsed_run)),
                      fmt_num(_first_step(healthy_run)))
    dc, dh = collapsed.diagnosis, healthy.diagnosis
    table.add_row("verdict", collapsed.verdict, healthy.verdict)
    table.add_row("diagnosis", dc.id if dc else "-", dh.id if dh else "-")
    keys = list(collapsed_stats) + [k for k in healthy_stats if k not in collapsed_stats]
    for k in keys:
        table.add_row(_stat_label(k), fmt_num(collapsed_stats.get(k)),
                      fmt_num(healthy_stats.get(k)))
    return table


def _first_step(report: Report) -> int | None:
    steps = [f.step for f in report.findings
             if f.severity in ("error", "warning") and f.step is not None]
    return min(steps) if steps else None


def panel_factory(err: Console) -> Callable[[str, Path], Any]:
    """The live panel around each of the demo's watched trainings (on `err`)."""

    @contextmanager
    def panel(name: str, run_dir: Path) -> Iterator[Callable[[], None]]:
        from vqdoctor.cli.panel import WatchPanel, open_display

        wp = WatchPanel(run_dir, rules_every=2.0)
        title = {"collapsed": "the collapsing run", "healthy": "the fixed run"}.get(name, name)
        display = open_display(wp, mode="auto", console=err, title=title, every=2.0)
        try:
            yield display.update
        finally:
            try:
                display.update(final=True)
            finally:
                display.close()

    return panel


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def finding_lines(report: Report, limit: int = 6) -> list[str]:
    """One short line per finding: `VQ004 ema-divergence [error] quantizer @step 1: message`."""
    lines = []
    for f in report.findings[:limit]:
        where = f" {f.quantizer}" if f.quantizer else ""
        at = f" @step {f.step}" if f.step is not None else ""
        lines.append(f"  {f.code} {f.id} [{f.severity}]{where}{at}: {f.message}")
    if len(report.findings) > limit:
        lines.append(f"  (+{len(report.findings) - limit} more)")
    return lines or ["  no findings"]


def _show_watched(out: Console, result: Any, width: int, color: bool) -> None:
    """Run diagnosis first (in full), the checkpoint view briefly, the fixed run briefly."""
    from vqdoctor.formats import format as render

    c_run, h_run = result.collapsed_run, result.healthy_run
    print_block(out, Rule("1. the collapsing run, as the live watch recorded it", style="red"),
                width=width)
    out.file.write(render(c_run, "text", width=width, color=color))
    out.print()
    print_block(out, Rule("   ... and from its checkpoints (vqdoctor inspect)", style="red"),
                width=width)
    for line in finding_lines(result.collapsed):
        out.print(Text(line), overflow="ellipsis", no_wrap=True, width=width)
    out.print()
    print_block(out, Rule("2. the same model, fixed", style="green"), width=width)
    out.print(Text(f"  live watch:  {h_run.summary_line()}"))
    out.print(Text(f"  checkpoint:  {result.healthy.summary_line()}"))
    out.print()


@boundary
def demo(
    keep: Annotated[Path | None, typer.Option(
        "--keep", readable=False, metavar="DIR", file_okay=False,
        help="Keep the demo's checkpoints and run data in DIR (default: a temporary folder).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the demo runs.")] = 0,
) -> None:
    """Train a tiny VQ model that collapses (CPU, < 30 s) under the live watch, diagnose it, then the fixed run."""
    run_demo = load_run_demo()
    out, err = out_console(), err_console()
    width, color = report_width(out), use_color(out)
    from vqdoctor.formats import format as render

    watched = _accepts(run_demo, "panel")
    with ExitStack() as stack:
        if keep is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vqdoctor-demo-")))
        else:
            workdir = keep
            workdir.mkdir(parents=True, exist_ok=True)
        # the live panel is the progress display of a watched demo; a spinner otherwise
        status = (stack.enter_context(err.status("training ..."))
                  if err.is_terminal and not watched else None)

        def progress(message: str) -> None:
            if status is not None:
                status.update(message)
            err.print(Text(f"  {message}", style="dim"))

        err.print(Text("vqdoctor demo: training two tiny VQ models on synthetic data (CPU), "
                       "watched live", style="bold"))
        kwargs: dict[str, Any] = {"panel": panel_factory(err)} if watched else {}
        result = run_demo(workdir, seed=seed, progress=progress, **kwargs)
        if status is not None:
            status.stop()

        if getattr(result, "collapsed_run", None) is not None and \
                getattr(result, "healthy_run", None) is not None:
            _show_watched(out, result, width, color)
        else:
            print_block(out, Rule("1. the collapsing run", style="red"), width=width)
            out.file.write(render(result.collapsed, "text", width=width, color=color))
            out.print()
            print_block(out, Rule("2. the same model, fixed", style="green"), width=width)
            out.file.write(render(result.healthy, "text", width=width, color=color))
            out.print()
        print_block(out, Rule("side by side"), width=width)
        print_block(out, comparison(result.collapsed, result.healthy,
                                    dict(getattr(result, "collapsed_stats", {}) or {}),
                                    dict(getattr(result, "healthy_stats", {}) or {}),
                                    getattr(result, "collapsed_run", None),
                                    getattr(result, "healthy_run", None)),
                    width=width)
        out.print()
        checkpoints: dict[str, Path] = dict(getattr(result, "checkpoints", {}) or {})
        run_dirs: dict[str, Path] = dict(getattr(result, "run_dirs", {}) or {})
        if checkpoints or run_dirs:
            out.print(Text("Inspect the saved runs and checkpoints yourself:", style="bold"))
            if keep is None:
                out.print(Text(f"  vqdoctor demo --seed {seed} --keep {KEEP_HINT_DIR}"))
            def shown(path: Path) -> str:
                p = (Path(KEEP_HINT_DIR) / Path(path).resolve().relative_to(workdir.resolve())
                     if keep is None and _inside(Path(path), workdir) else Path(path))
                return shlex.quote(str(p))

            for run in ("collapsed", "healthy"):
                if run in run_dirs:
                    out.print(Text(f"  vqdoctor report {shown(run_dirs[run])}"))
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


__all__ = ["comparison", "demo", "finding_lines", "load_run_demo", "panel_factory"]
