"""Hugging Face `Trainer` callback: `Trainer(..., callbacks=[VQDoctorCallback()])`.

```python
from transformers import Trainer
from vqdoctor.integrations.transformers import VQDoctorCallback
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[VQDoctorCallback()])
```

A thin adapter over `vqdoctor.integrations.core.TrainerWatch` (a Doctor):

- `on_train_begin`: the watch attaches to `kwargs["model"]`, steps numbered from
  `state.global_step`; a forward hook on the model keeps the loss its output carries
  (`output.loss` / `output["loss"]`, as the Trainer reads it) as the step's loss, on the device;
- `on_pre_optimizer_step`: gradients are final (clipped): their norms are measured (on the
  cadence steps, as the Doctor's optimizer hook would);
- `on_step_end`: a step that completes a flush interval is flushed now (not at the next
  forward), so `on_log` of that step has its values; new alerts become `VQDoctorAlert` warnings and, with `fail_on=`, the
  first one at or above it sets `control.should_training_stop`;
- `on_log`: the latest per-quantizer metrics `vqdoctor/<quantizer>/<metric>` are merged into
  `logs`, so every reporting integration (TensorBoard, W&B, MLflow, the console) gets them. The
  callback moves itself ahead of the Trainer's reporting callbacks at `on_train_begin`, since
  those are called first otherwise;
- `on_train_end`: the watch closes, the world-process-zero writes the report into the run
  directory (report.txt, report.json, report.html); it is `callback.report` then. An exception
  the Trainer does not catch closes the record as "failed" at interpreter exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from vqdoctor.integrations.core import TrainerWatch, VQDoctorAlert, loss_of
from vqdoctor.integrations.export import METRICS

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover
    raise ImportError("vqdoctor.integrations.transformers needs transformers "
                      "(pip install 'vqdoctor[hf]')") from e


class VQDoctorCallback(TrainerCallback):
    """Watch the quantizers of the model a `transformers.Trainer` trains.

    Args:
        run_dir: where to record (default: a new folder under ./vqdoctor-runs/).
        flush_every: steps between device->host copies; metrics reach `logs` at this cadence.
        stats_every: steps between cadence statistics.
        window: steps of the windowed usage metrics (default: automatic).
        quantizers: module paths or modules to watch (default: all found).
        fail_on: "error" or "warning": stop the training (`control.should_training_stop`) at
            the first alert at or above it; None never stops.
        metrics: which per-quantizer metrics to merge into `logs`.
        reports: report formats written into the run directory at the end.
        alerts: raise new alerts as `VQDoctorAlert` warnings.
        thresholds: rule threshold overrides.
        tensorboard: also write TensorBoard event files to this folder.
        wandb: also log to W&B directly (`vqdoctor.watch(wandb=)`); with `report_to="wandb"` the
            metrics already reach W&B through `logs`.
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, flush_every: int = 50,
                 stats_every: int = 10, window: int | None = None, quantizers: Sequence[Any] | None = None,
                 fail_on: str | None = None, metrics: Sequence[str] = METRICS,
                 reports: Sequence[str] = ("text", "json", "html"), alerts: bool = True,
                 thresholds: dict[str, dict[str, Any]] | None = None, tensorboard: str | None = None,
                 wandb: Any = None):
        self.core = TrainerWatch(run_dir, flush_every=flush_every, stats_every=stats_every, window=window,
                                 quantizers=quantizers, fail_on=fail_on, metrics=metrics, reports=reports,
                                 alerts=alerts, thresholds=thresholds, tensorboard=tensorboard, wandb=wandb)
        self._hook: Any = None

    @property
    def doctor(self) -> Any:
        """The live `vqdoctor.live.doctor.Doctor` (None before training or when the watch is off)."""
        return self.core.doctor

    @property
    def report(self) -> Any:
        """The ranked report written at the end of training."""
        return self.core.report

    @property
    def stop_reason(self) -> Any:
        """The alert that made the callback stop the training."""
        return self.core.stop_reason

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach the watch to `kwargs["model"]` and the loss hook; go ahead of the reporters."""
        model = kwargs.get("model")
        self.core.raise_alerts = self.core.raise_alerts and bool(getattr(state, "is_world_process_zero", True))
        if model is None or not self.core.start(model, start_step=int(getattr(state, "global_step", 0) or 0)):
            return
        try:
            self._hook = model.register_forward_hook(self._loss_hook)
        except Exception:  # the loss is optional
            self._hook = None
        self._go_first()

    def _loss_hook(self, module: Any, args: Any, output: Any) -> None:
        try:
            if module.training:
                loss = loss_of(output)
                if loss is not None and getattr(loss, "requires_grad", False):
                    self.core.record_loss(loss)
        except Exception:  # never break the forward
            pass

    def _go_first(self) -> None:
        """Move this callback to the front of the Trainer's list, so that `on_log` has merged
        the metrics into `logs` before the reporting callbacks read it."""
        try:
            handler = sys._getframe(2).f_locals.get("self")  # CallbackHandler.call_event
            callbacks = getattr(handler, "callbacks", None)
            if isinstance(callbacks, list) and self in callbacks:
                callbacks.remove(self)
                callbacks.insert(0, self)
        except Exception:
            pass

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Gradients are final (clipped): measure their norms on the cadence steps."""
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            self.core.measure_gradients(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """At a flush: raise new alerts; stop the training when `fail_on` says so."""
        core = self.core
        if core.doctor is None:
            return None
        core.flush_if_due()
        if not core.pending:
            return None
        try:
            core.take()
            core.new_alerts()
            if core.should_stop:
                control.should_training_stop = True
        except Exception as e:
            core._disable("the Trainer callback failed", e)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        """Merge the latest vqdoctor metrics into `logs` (when a flush came since the last log)."""
        core = self.core
        if core.doctor is None or logs is None:
            return
        try:
            core.take()
            logs.update(core.latest())
        except Exception as e:
            core._disable("the Trainer callback failed", e)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the watch and write the report."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.core.finish("finished")


__all__ = ["VQDoctorAlert", "VQDoctorCallback"]
