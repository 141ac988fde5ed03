"""PyTorch Lightning callback: `Trainer(callbacks=[VQDoctorCallback()])`.

```python
import lightning as L
from vqdoctor.integrations.lightning import VQDoctorCallback
trainer = L.Trainer(callbacks=[VQDoctorCallback(fail_on="error")])
```

A thin adapter over `vqdoctor.integrations.core.TrainerWatch` (a Doctor), on the model of
Lightning's own `SpikeDetection`:

- `on_fit_start`: the watch attaches to the LightningModule (its quantizers are found as in
  `vqdoctor.watch`), its steps numbered on from a restored checkpoint's step (so a resumed fit
  continues the numbering);
- steps are the optimizer steps, counted by the Doctor's own optimizer-step hooks (the same
  clock as `vqdoctor.watch`, so the records match a plain loop's); `on_before_optimizer_step`
  measures the gradient norms (Lightning's closure runs forward and backward inside
  `optimizer.step`, after its pre-step hook); `on_train_batch_end` records the step's loss from
  `outputs`;
- at each flush (every `flush_every` steps) `on_train_batch_end` sends the per-quantizer metrics
  `vqdoctor/<quantizer>/<metric>` to every `trainer.loggers` (`log_metrics(..., step=)` at their
  own steps) and puts the latest into `trainer.callback_metrics` (`pl_module.log_dict`, so a
  `ModelCheckpoint(monitor="vqdoctor/...")` can use them); new alerts become `VQDoctorAlert`
  warnings (rank 0), and with `fail_on=` the first alert at or above it sets
  `trainer.should_stop`;
- `on_fit_end` / `on_exception` close the watch ("finished" / "failed"); rank 0 writes the report
  into the run directory (report.txt, report.json, report.html); it is `callback.report` then;
- `state_dict` / `load_state_dict` keep the step and the alerts already raised across a resume.

Requires `lightning` (pip install 'vqdoctor[lightning]'); `pytorch_lightning` works too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from vqdoctor.integrations.core import TrainerWatch, VQDoctorAlert, loss_of
from vqdoctor.integrations.export import METRICS

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError("vqdoctor.integrations.lightning needs lightning "
                          "(pip install 'vqdoctor[lightning]')") from e


class VQDoctorCallback(Callback):
    """Watch the quantizers of a LightningModule while `Trainer.fit` runs.

    Args:
        run_dir: where to record (default: a new folder under ./vqdoctor-runs/).
        flush_every: steps between device->host copies; metrics reach the loggers at this cadence.
        stats_every: steps between cadence statistics (scale, drift, gradients).
        window: steps of the windowed usage metrics (default: automatic).
        quantizers: module paths or modules to watch (default: all found).
        fail_on: "error" or "warning": stop training (`trainer.should_stop`) at the first alert at
            or above it; None never stops.
        log: send the metrics to the trainer's loggers.
        metrics: which per-quantizer metrics to log.
        reports: report formats rank 0 writes into the run directory at the end.
        alerts: raise new alerts as `VQDoctorAlert` warnings.
        thresholds: rule threshold overrides.
        tensorboard: also write TensorBoard event files to this folder (independent of the loggers).
        wandb: also log to W&B (`vqdoctor.watch(wandb=)`).

    Attributes:
        report: the ranked report after the fit (None before, or when the watch was off).
        stop_reason: the alert that stopped the training, if any.
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, flush_every: int = 50,
                 stats_every: int = 10, window: int | None = None, quantizers: Sequence[Any] | None = None,
                 fail_on: str | None = None, log: bool = True, metrics: Sequence[str] = METRICS,
                 reports: Sequence[str] = ("text", "json", "html"), alerts: bool = True,
                 thresholds: dict[str, dict[str, Any]] | None = None, tensorboard: str | None = None,
                 wandb: Any = None):
        super().__init__()
        self.core = TrainerWatch(run_dir, flush_every=flush_every, stats_every=stats_every, window=window,
                                 quantizers=quantizers, fail_on=fail_on, metrics=metrics, reports=reports,
                                 alerts=alerts, thresholds=thresholds, tensorboard=tensorboard, wandb=wandb)
        self.log = bool(log)
        self._restored: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        """One entry per callback class in a checkpoint."""
        return "VQDoctorCallback"

    @property
    def doctor(self) -> Any:
        """The live `vqdoctor.live.doctor.Doctor` (None before `fit` or when the watch is off)."""
        return self.core.doctor

    @property
    def report(self) -> Any:
        """The ranked report written at the end of the fit."""
        return self.core.report

    @property
    def stop_reason(self) -> Any:
        """The alert that made the callback stop the training."""
        return self.core.stop_reason

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach the watch to the LightningModule."""
        self.core.raise_alerts = self.core.raise_alerts and trainer.is_global_zero
        # a resumed fit restores the callbacks before on_fit_start, the loop counters only after it
        step = max(int(trainer.global_step), int(self._restored.get("step") or 0))
        self.core.start(pl_module, start_step=step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Gradients are final: measure their norms (the step itself is counted by the Doctor's
        optimizer hooks)."""
        self.core.measure_gradients(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Record the loss; at a flush, log the metrics, raise alerts, stop when asked to."""
        core = self.core
        if core.doctor is None:
            return
        try:
            core.record_loss(loss_of(outputs))
            if core.pending:
                self._publish(trainer, pl_module)
                core.new_alerts()
                if core.should_stop and not trainer.should_stop:
                    trainer.should_stop = True
        except Exception as e:  # never break the training
            core._disable("the Lightning callback failed", e)

    def _publish(self, trainer: Any, pl_module: Any) -> None:
        rows = self.core.take()
        if not self.log or not rows:
            return
        for logger in getattr(trainer, "loggers", []) or []:
            for step, vals in rows:
                logger.log_metrics(vals, step=step)
        vals = self.core.latest()
        if vals and getattr(pl_module, "_current_fx_name", None) is not None:
            pl_module.log_dict(vals, on_step=True, on_epoch=False, logger=False, prog_bar=False,
                               batch_size=1)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the watch and write the report (rank 0)."""
        self._finish(trainer, "finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the watch as failed (the records so far stay readable)."""
        self._finish(trainer, "failed")

    def _finish(self, trainer: Any, status: str) -> None:
        core = self.core
        if core.doctor is None:
            return
        core.finish(status)
        if core.pending and self.log:  # the final flush
            rows = core.take()
            for logger in getattr(trainer, "loggers", []) or []:
                for step, vals in rows:
                    logger.log_metrics(vals, step=step)
                try:
                    logger.save()
                except Exception:
                    pass

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The step, the run directory and the alerts already raised."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step to number on from and the alerts already raised."""
        self._restored = dict(state_dict)
        self.core.load_state_dict(state_dict)


__all__ = ["VQDoctorAlert", "VQDoctorCallback"]
