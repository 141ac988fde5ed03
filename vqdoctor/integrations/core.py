"""The one object behind the trainer callbacks: a Doctor plus what a trainer needs around it.

On the model of Lightning's `SpikeDetection` (a core object and a thin adapter per framework):
`TrainerWatch` starts the watch on the model a trainer hands over, queues the records of each
flush (they are already on the host), turns them into logger scalars, raises alerts as
warnings, decides when to stop (`fail_on`), and writes the report at the end. The adapters
(`vqdoctor.integrations.lightning`, `vqdoctor.integrations.transformers`) only translate the
trainer's hooks into these calls.

Never breaks training: every call is guarded; a failure warns once (`WatchWarning`), turns the
watch off, and the training goes on.
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqdoctor.integrations.export import METRICS, latest, scalars
from vqdoctor.live.store import WatchWarning

if TYPE_CHECKING:
    from vqdoctor.live.alerts import Alert
    from vqdoctor.live.doctor import Doctor
    from vqdoctor.results.model import Report

SEVERITY_RANK = {"error": 0, "warning": 1}
REPORT_NAMES = {"text": "report.txt", "json": "report.json", "markdown": "report.md", "html": "report.html"}


class VQDoctorAlert(UserWarning):
    """A finding vqdoctor raised while the model trains (an error or a warning finding)."""


class TrainerWatch:
    """A watch driven by a trainer's callbacks.

    Args:
        run_dir: where to record (default: a new folder under ./vqdoctor-runs/).
        flush_every: steps between device->host copies (logger values arrive at this cadence).
        stats_every: steps between cadence statistics.
        window: steps of the windowed usage metrics (default: automatic).
        quantizers: module paths or modules to watch (default: all found).
        fail_on: "error" or "warning": ask the trainer to stop at the first alert at or above it
            (None: never stop).
        metrics: per-quantizer metrics sent to the trainer's loggers (`vqdoctor.integrations.export.METRICS`).
        reports: formats of the report written into the run directory at the end by rank 0
            (report.txt, report.json, report.md, report.html); () for none.
        alerts: raise each new alert as a `VQDoctorAlert` warning.
        thresholds: rule threshold overrides for the alerts and the report.
        tensorboard: also write TensorBoard event files here (`vqdoctor.watch(tensorboard=)`).
        wandb: also log to W&B (`vqdoctor.watch(wandb=)`).
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, flush_every: int = 50,
                 stats_every: int = 10, window: int | None = None, quantizers: Sequence[Any] | None = None,
                 fail_on: str | None = None, metrics: Sequence[str] = METRICS,
                 reports: Sequence[str] = ("text", "json", "html"), alerts: bool = True,
                 thresholds: dict[str, dict[str, Any]] | None = None, tensorboard: str | None = None,
                 wandb: Any = None):
        if fail_on not in (None, "never", "error", "warning"):
            from vqdoctor.errors import ConfigError

            raise ConfigError(f"fail_on must be 'error', 'warning' or None, not {fail_on!r}")
        self.run_dir = run_dir
        self.options = {"flush_every": flush_every, "stats_every": stats_every, "window": window,
                        "quantizers": quantizers, "tensorboard": tensorboard, "wandb": wandb}
        self.fail_on = None if fail_on == "never" else fail_on
        self.metrics = tuple(metrics)
        self.reports = tuple(reports)
        self.raise_alerts = bool(alerts)
        self.thresholds = thresholds
        self.doctor: Doctor | None = None
        self.pending: list[dict[str, Any]] = []
        self.alerted: set[tuple[str, str | None]] = set()
        self.stop_reason: Alert | None = None
        self.report: Report | None = None
        self.report_paths: list[Path] = []
        self.off = False
        self._latest: dict[str, float] = {}
        self._fresh = False
        self._atexit: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, model: Any, *, start_step: int = 0) -> bool:
        """Attach the watch to `model` (a trainer's module); False when it could not start."""
        if self.doctor is not None or self.off:
            return self.doctor is not None
        try:
            from vqdoctor.live.doctor import watch

            o = self.options
            self.doctor = watch(model, self.run_dir, flush_every=o["flush_every"], stats_every=o["stats_every"],
                                window=o["window"], quantizers=o["quantizers"], start_step=int(start_step),
                                on_flush=self._on_flush, tensorboard=o["tensorboard"], wandb=o["wandb"])
            self.doctor.start()
        except Exception as e:
            self._disable("could not start the watch", e)
            return False
        self._atexit = self._at_exit
        atexit.register(self._atexit)
        return True

    def finish(self, status: str = "finished") -> Report | None:
        """Close the watch (final flush, end-of-run records) and build the report; rank 0 writes it.

        Returns:
            The report, None when the watch was off.
        """
        doc = self.doctor
        if doc is None or doc.closed:
            return self.report
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        try:
            doc.close(status)
            self.report = doc.report(self.thresholds)
        except Exception as e:
            self._disable("could not finish the run record", e)
            return None
        if doc.rank == 0:
            self.report_paths = self._write_reports(self.report)
        return self.report

    def _at_exit(self) -> None:
        # the process ends without the trainer's end hook (an exception the trainer has no hook for)
        if self.doctor is not None and not self.doctor.closed:
            try:
                self.doctor.close("failed")
            except Exception:
                pass

    def _write_reports(self, report: Report) -> list[Path]:
        from vqdoctor.formats import format as render

        out = []
        for fmt in self.reports:
            path = Path(self.doctor.run_dir) / REPORT_NAMES.get(fmt, f"report.{fmt}")
            try:
                path.write_text(render(report, fmt), encoding="utf-8")
                out.append(path)
            except Exception as e:
                warnings.warn(f"vqdoctor: could not write {path} ({type(e).__name__}: {e})", WatchWarning,
                              stacklevel=3)
        return out

    def _disable(self, what: str, e: BaseException) -> None:
        self.off = True
        warnings.warn(f"vqdoctor: {what} ({type(e).__name__}: {e}); training continues unwatched",
                      WatchWarning, stacklevel=3)
        doc, self.doctor = self.doctor, None
        if doc is not None and not doc.closed:
            try:
                doc.close("failed")
            except Exception:
                pass

    # ------------------------------------------------------------------ during training

    def _on_flush(self, records: list[dict[str, Any]]) -> None:
        # called inside the recorder's flush: only queue (the trainer's hook logs them)
        self.pending.extend(records)

    def record_loss(self, loss: Any) -> None:
        """Record the loss of the current step (a tensor stays on its device)."""
        if self.doctor is not None and loss is not None:
            self.doctor.record_loss(loss)

    def measure_gradients(self, optimizer: Any) -> None:
        """Measure the gradient norms of this step now (gradients final, the step not taken yet).

        A closure optimizer step (Lightning's automatic optimization) runs the optimizer's
        pre-step hook, where the Doctor normally measures them, *before* the forward and backward
        inside the closure; so the trainer's own "before optimizer step" hook measures them
        instead, once, on the cadence steps, exactly as the pre-step hook would (the pre-step
        hook then sees them measured and skips).
        """
        rec = getattr(self.doctor, "_recorder", None)
        if rec is None or rec.closed:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer / AcceleratedOptimizer
        try:
            if getattr(rec, "grad_step", None) == getattr(rec, "fwd_step", None):
                rec.grad_step = None  # measured before this step's backward: stale or empty
            rec._opt_pre(inner, (), {})
        except Exception as e:
            self._disable("gradient norms failed", e)

    def flush_if_due(self) -> None:
        """Flush now when the step just ended completes a flush interval.

        The Doctor ends a step lazily, at the next training forward, so without this a flush
        that completes at step s would reach the trainer's logs one logging call late. Called
        after the optimizer step (the trainer's "step end"), it moves that same flush earlier:
        still one device-to-host copy per interval.
        """
        doc = self.doctor
        if doc is None or doc.closed:
            return
        every = int(doc.config["flush_every"])
        if (doc.current_step + 1 - int(doc.config["start_step"])) % every == 0:
            doc.flush()

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """The logger scalars of the records flushed since the last call: (step, {tag: value})."""
        records, self.pending = self.pending, []
        if not records:
            return []
        step, vals = latest(records, self.metrics)
        if vals:
            self._latest.update(vals)
            self._fresh = True
        return scalars(records, self.metrics)

    def latest(self, *, fresh_only: bool = True) -> dict[str, float]:
        """The latest logged values (with `fresh_only`, only when a flush came since the last call)."""
        if fresh_only and not self._fresh:
            return {}
        self._fresh = False
        return dict(self._latest)

    def new_alerts(self) -> list[Alert]:
        """Alerts not raised before (each raised once, as a warning when `alerts` is on); notes
        the first one at or above `fail_on` in `stop_reason`."""
        if self.doctor is None:
            return []
        try:
            current = self.doctor.alerts
        except Exception as e:
            self._disable("alerts failed", e)
            return []
        new = [a for a in current if (a.id, a.quantizer) not in self.alerted]
        for a in new:
            self.alerted.add((a.id, a.quantizer))
            if self.raise_alerts:
                warnings.warn(f"vqdoctor: {a.line()}", VQDoctorAlert, stacklevel=3)
            if (self.stop_reason is None and self.fail_on is not None
                    and SEVERITY_RANK.get(a.severity, 9) <= SEVERITY_RANK[self.fail_on]):
                self.stop_reason = a
        return new

    @property
    def should_stop(self) -> bool:
        """True once an alert at or above `fail_on` was raised."""
        return self.stop_reason is not None

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the step, the run directory, the alerts already raised."""
        doc = self.doctor
        return {"version": 1, "step": doc.current_step if doc is not None else None,
                "run_dir": str(doc.run_dir) if doc is not None else (str(self.run_dir) if self.run_dir else None),
                "alerted": [list(k) for k in sorted(self.alerted, key=str)]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the alerts already raised (so a resumed run does not raise them again)."""
        for k in state.get("alerted") or []:
            if isinstance(k, (list, tuple)) and len(k) == 2:
                self.alerted.add((str(k[0]), None if k[1] is None else str(k[1])))


def loss_of(outputs: Any) -> Any:
    """The loss in a training step's outputs: a tensor, `outputs["loss"]`, or `outputs.loss`."""
    if outputs is None:
        return None
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if hasattr(outputs, "loss"):
        return outputs.loss
    try:
        import torch

        if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
            return outputs
    except ImportError:  # pragma: no cover
        pass
    return None


__all__ = ["REPORT_NAMES", "TrainerWatch", "VQDoctorAlert", "loss_of"]
