"""`vqdoctor report RUN --plot out.png`: the report's charts as one image (matplotlib, Agg).

The same data as the HTML report's charts (`Report.series`): perplexity, usage and dead fraction
over steps with the steps the alerts first held marked, the scale ratio, the loss, the
rank-frequency curve and the code-norm histograms. matplotlib is an optional extra
(pip install 'vqdoctor[plot]'); it is imported here only, with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from vqdoctor.errors import ConfigError, InputError
from vqdoctor.results.model import Report

MAX_LINES = 8
MARK_COLOR = {"error": "#dc2626", "warning": "#d97706"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib (pip install 'vqdoctor[plot]')") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _panels(report: Report) -> list[tuple[str, dict[str, Any]]]:
    """(title, spec) of every panel the series can fill, in page order."""
    s = report.series
    if s is None:
        return []
    qs = [q for q in report.quantizers if q.name in s.quantizers]
    stepped = [q for q in qs if s.quantizers[q.name].steps][:MAX_LINES]
    out: list[tuple[str, dict[str, Any]]] = []
    for key, title, kw in (("perplexity", "batch perplexity", {}),
                           ("usage_window", "codes used over the window", {"pct": True}),
                           ("dead_fraction", "dead fraction", {"pct": True}),
                           ("scale_ratio", "scale ratio ||z|| / ||e||", {"log": True})):
        lines = [(q.name or "(root)", s.quantizers[q.name].steps, s.quantizers[q.name].metrics[key])
                 for q in stepped if key in s.quantizers[q.name].metrics]
        if lines:
            out.append((title, {"kind": "steps", "lines": lines, **kw}))
    if s.run.get("steps") and s.run.get("loss"):
        out.append(("loss", {"kind": "steps", "lines": [("loss", s.run["steps"], s.run["loss"])],
                             "log": all(v is None or v > 0 for v in s.run["loss"]), "run": True}))
    rf = [(q.name or "(root)", s.quantizers[q.name].rank_frequency) for q in qs[:MAX_LINES]
          if s.quantizers[q.name].rank_frequency]
    if rf:
        out.append(("rank-frequency (log-log)", {"kind": "rank", "curves": rf}))
    for q in qs[:MAX_LINES]:
        cn = s.quantizers[q.name].code_norms
        if cn and cn.get("counts"):
            out.append((f"{q.name or '(root)'}: code norms", {"kind": "hist", **cn}))
    return out


def plot_report(report: Report, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Draw the report's charts into one PNG (or any format matplotlib infers from the suffix).

    Raises:
        ConfigError: matplotlib is missing.
        InputError: the report holds nothing to plot, or the file cannot be written.
    """
    panels = _panels(report)
    if not panels:
        raise InputError("nothing to plot: the report carries no series (a run or checkpoint "
                         "report built by vqdoctor has them)")
    plt = _pyplot()
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.1 * rows), squeeze=False)
    d = report.diagnosis
    fig.suptitle(f"vqdoctor: {report.verdict}" + (f" - {d.code} {d.id}" if d else ""), fontsize=13,
                 color={"failing": "#dc2626", "warning": "#d97706"}.get(report.verdict, "#059669"))
    marks = [(f.step, f.code, f.severity) for f in report.findings
             if f.step is not None and f.severity in MARK_COLOR]
    for ax, (title, spec) in zip(axes.flat, panels, strict=False):
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if spec["kind"] == "steps":
            for name, xs, ys in spec["lines"]:
                ax.plot(xs, [math.nan if v is None else v for v in ys], label=name, lw=1.4)
            if spec.get("log"):
                ax.set_yscale("log")
            if spec.get("pct"):
                ax.set_ylim(0, 1)
            for step, code, sev in dict.fromkeys(marks):
                ax.axvline(step, color=MARK_COLOR[sev], ls="--", lw=0.9)
                ax.annotate(code, (step, 1), xycoords=("data", "axes fraction"), fontsize=7,
                            color=MARK_COLOR[sev], xytext=(2, -9), textcoords="offset points")
            ax.set_xlabel("step", fontsize=8)
            if len(spec["lines"]) > 1:
                ax.legend(fontsize=7)
        elif spec["kind"] == "rank":
            for name, rf in spec["curves"]:
                ax.loglog(rf["rank"], rf["share"], label=name, lw=1.4)
            ax.set_xlabel("code rank", fontsize=8)
            ax.set_ylabel("share of assignments", fontsize=8)
            if len(spec["curves"]) > 1:
                ax.legend(fontsize=7)
        else:
            edges, counts = spec["edges"], spec["counts"]
            ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:], strict=True)],
                   align="edge", color="#2563eb")
            ax.set_xlabel("||e||", fontsize=8)
            ax.set_ylabel("codes", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=dpi)
    except OSError as e:
        raise InputError(f"cannot write the plot: {e.strerror or e}", path=str(out)) from None
    finally:
        plt.close(fig)
    return out


__all__ = ["plot_report"]
