"""Export a watched run to the user's logger: TensorBoard and Weights & Biases.

Exporters are `on_flush` callbacks of the Doctor: they receive each flush's records, already
on the host, so exporting never synchronises the device between flushes. They write at the
flush cadence:

- scalars `vqdoctor/<quantizer>/<metric>` (and `vqdoctor/run/<metric>` for the loss and the
  gradient norms), TensorBoard at every recorded step, W&B once per flush (the latest values,
  against the custom x axis `vqdoctor/step`, so they never move the user's own W&B step);
- usage: TensorBoard gets the code counts of each interval as a histogram over code indices
  (`add_histogram_raw`); W&B, whose histograms hold at most 512 bins, gets the rank-frequency
  curve (share of assignments by code rank) as a line plot every `rank_every` flushes.

Only rank 0 exports (`build_exporters`). Any failure inside an exporter is the recorder's to
catch: the exporter is disabled with one warning and the training goes on. See
docs/integrations.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vqdoctor.errors import ConfigError

METRICS = ("perplexity", "perplexity_fraction", "usage_window", "dead_fraction", "top1_share",
           "entropy_norm_window", "scale_ratio", "quant_error_rel", "codes_replaced", "st_grad_ratio")
"""Per-quantizer metrics exported by default (names: `vqdoctor.metrics.names`)."""
RUN_METRICS = ("loss", "grad_norm_encoder", "grad_norm_decoder", "grad_norm_quantizer")
"""Run-wide metrics exported by default."""
MAX_BUCKETS = 1024
WANDB_POINTS = 256


def tag(quantizer: str | None, metric: str) -> str:
    """`vqdoctor/<quantizer>/<metric>`; run-wide values under `vqdoctor/run/<metric>`."""
    return f"vqdoctor/{'run' if quantizer is None else (quantizer or 'root')}/{metric}"


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def scalars(records: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS,
            run_metrics: Sequence[str] = RUN_METRICS) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) for every step of `records` that holds an exported value, ascending.

    Non-finite values are left out (a logger would draw them as gaps or reject them); the
    report keeps them.
    """
    by_step: dict[int, dict[str, float]] = {}
    for r in records:
        t, s = r.get("t"), r.get("step")
        if not isinstance(s, int) or t not in ("step", "run"):
            continue
        keys, q = (metrics, str(r.get("q", ""))) if t == "step" else (run_metrics, None)
        for k in keys:
            x = _finite(r.get(k))
            if x is not None:
                by_step.setdefault(s, {})[tag(q, k)] = x
    return sorted(by_step.items())


def latest(records: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS,
           run_metrics: Sequence[str] = RUN_METRICS) -> tuple[int | None, dict[str, float]]:
    """(last step, the latest value of every exported tag) over `records`."""
    out: dict[str, float] = {}
    last = None
    for s, vals in scalars(records, metrics, run_metrics):
        out.update(vals)
        last = s
    return last, out


def hist_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `hist` records (code counts of an interval) among `records`."""
    return [r for r in records if r.get("t") == "hist" and isinstance(r.get("counts"), list)]


def per_code(r: dict[str, Any]) -> list[float]:
    """Counts per code of a `hist` record, heads summed."""
    c = [float(x) for x in r["counts"]]
    heads = max(1, int(r.get("heads") or 1))
    k = len(c) // heads
    return [sum(c[h * k + i] for h in range(heads)) for i in range(k)] if heads > 1 else c


class TensorBoardExporter:
    """Write the watch's metrics to a TensorBoard log directory.

    Args:
        log_dir: the folder for the event files (created).
        metrics: per-quantizer metrics to write (default `METRICS`).
        histograms: also write each interval's code counts as a histogram.
        writer: an existing `torch.utils.tensorboard.SummaryWriter` to write to instead.

    Raises:
        ConfigError: the `tensorboard` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, metrics: Sequence[str] = METRICS,
                 histograms: bool = True, writer: Any = None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("TensorBoard export needs the tensorboard package "
                                  "(pip install 'vqdoctor[tensorboard]')") from e
            if log_dir is None:
                raise ConfigError("TensorBoard export needs a log directory")
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer
        self.log_dir = Path(getattr(writer, "log_dir", log_dir or "."))
        self.metrics = tuple(metrics)
        self.histograms = bool(histograms)
        self.__name__ = "tensorboard"

    def __call__(self, records: list[dict[str, Any]]) -> None:
        """Write one flush's records (scalars at their steps, then the histograms)."""
        w = self.writer
        for step, vals in scalars(records, self.metrics):
            for k, v in vals.items():
                w.add_scalar(k, v, global_step=step)
        if self.histograms:
            for r in hist_records(records):
                self._histogram(r)
        w.flush()

    def _histogram(self, r: dict[str, Any]) -> None:
        counts = per_code(r)
        total = sum(counts)
        if not counts or total <= 0:
            return
        width = max(1, math.ceil(len(counts) / MAX_BUCKETS))  # contiguous code blocks, not resampled
        buckets = [sum(counts[i:i + width]) for i in range(0, len(counts), width)]
        limits = [float(min(len(counts), i + width)) - 0.5 for i in range(0, len(counts), width)]
        centers = [i + 0.0 for i in range(len(counts))]
        s1 = sum(c * x for c, x in zip(counts, centers, strict=True))
        s2 = sum(c * x * x for c, x in zip(counts, centers, strict=True))
        used = [i for i, c in enumerate(counts) if c > 0]
        self.writer.add_histogram_raw(tag(str(r.get("q", "")), "code_counts"), min=float(used[0]),
                                      max=float(used[-1]), num=total, sum=s1, sum_squares=s2,
                                      bucket_limits=limits, bucket_counts=buckets,
                                      global_step=int(r["step"]))

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbExporter:
    """Log the watch's metrics to Weights & Biases.

    Logs into the active run (`wandb.run`, e.g. the one your script or the HF/Lightning W&B
    logger started) with `commit=False`, so the values ride on your next `wandb.log` and your
    step is never moved; without an active run it starts one (`wandb.init(project=...)`) and
    owns it (logs with `step=`, finishes it at close). Values are plotted against
    `vqdoctor/step` (`define_metric`).

    Args:
        run: a `wandb` run to log to (default: the active one, else a new one).
        project: project of a run started here (default `$WANDB_PROJECT`, else "vqdoctor").
        metrics: per-quantizer metrics to log (default `METRICS`).
        rank_every: log the rank-frequency curve every this many flushes (0: never).
        init: further `wandb.init` arguments for a run started here.

    Raises:
        ConfigError: the `wandb` package is not installed.
    """

    def __init__(self, run: Any = None, *, project: str | None = None, metrics: Sequence[str] = METRICS,
                 rank_every: int = 10, **init: Any):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("W&B export needs the wandb package (pip install 'vqdoctor[wandb]')") from e
        self.wandb = wandb
        self.run = run
        self.own = False
        self.project = project
        self.metrics = tuple(metrics)
        self.rank_every = int(rank_every)
        self.init = init
        self.flushes = 0
        self._defined = False
        self.__name__ = "wandb"

    def _active(self) -> Any:
        if self.run is None:
            self.run = self.wandb.run
        if self.run is None:
            project = self.project or os.environ.get("WANDB_PROJECT") or "vqdoctor"
            self.run = self.wandb.init(project=project, **self.init)
            self.own = True
        if not self._defined:
            self.run.define_metric("vqdoctor/step")
            self.run.define_metric("vqdoctor/*", step_metric="vqdoctor/step")
            self._defined = True
        return self.run

    def __call__(self, records: list[dict[str, Any]]) -> None:
        """Log one flush: the latest scalars, and the rank-frequency curve when due."""
        step, payload = latest(records, self.metrics)
        if step is None:
            return
        run = self._active()
        if self.rank_every and self.flushes % self.rank_every == 0:
            for r in hist_records(records):
                curve = self.rank_frequency(r)
                if curve is not None:
                    payload[tag(str(r.get("q", "")), "rank_frequency")] = curve
        self.flushes += 1
        payload["vqdoctor/step"] = step
        if self.own:
            run.log(payload, step=step, commit=True)
        else:
            run.log(payload, commit=False)

    def rank_frequency(self, r: dict[str, Any]) -> Any:
        """A W&B line plot of the share of assignments by code rank (log-spaced ranks)."""
        counts = sorted(per_code(r), reverse=True)
        total = sum(counts)
        if total <= 0:
            return None
        k = len(counts)
        ranks = sorted({max(1, min(k, round(k ** (i / (WANDB_POINTS - 1))))) for i in range(WANDB_POINTS)})
        table = self.wandb.Table(columns=["rank", "share"], data=[[r_, counts[r_ - 1] / total] for r_ in ranks])
        return self.wandb.plot.line(table, "rank", "share",
                                    title=f"vqdoctor {r.get('q', '')}: rank-frequency @step {r.get('step')}")

    def close(self) -> None:
        """Finish the run when this exporter started it."""
        if self.own and self.run is not None:
            self.run.finish()


def build_exporters(tensorboard: str | os.PathLike[str] | None = None, wandb: Any = None,
                    exporters: Sequence[Callable[[list[dict[str, Any]]], None]] | None = None,
                    *, rank: int = 0) -> list[Callable[[list[dict[str, Any]]], None]]:
    """The exporters a `vqdoctor.watch(...)` call asked for (rank 0 only for TensorBoard / W&B).

    Args:
        tensorboard: a log directory for TensorBoard event files.
        wandb: True (the active W&B run, else a new one), a dict of `WandbExporter` arguments
            (e.g. {"project": "vq"}), or a wandb run object.
        exporters: further callables taking each flush's records.
        rank: this process's data-parallel rank.

    Raises:
        ConfigError: an exporter's package is not installed.
    """
    out: list[Callable[[list[dict[str, Any]]], None]] = list(exporters or [])
    if rank != 0:
        return out
    if tensorboard:
        out.append(TensorBoardExporter(tensorboard))
    if wandb is not None and wandb is not False:
        if wandb is True:
            out.append(WandbExporter())
        elif isinstance(wandb, dict):
            out.append(WandbExporter(**wandb))
        else:
            out.append(WandbExporter(run=wandb))
    return out


def close_exporters(callbacks: Iterable[Any]) -> None:
    """Call `close()` on every callback that has one (failures are ignored: the run is over)."""
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                pass


__all__ = ["METRICS", "RUN_METRICS", "TensorBoardExporter", "WandbExporter", "build_exporters",
           "close_exporters", "latest", "scalars", "tag"]
