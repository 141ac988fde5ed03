"""vqdoctor: tells you why your VQ codebook is collapsing.

Public API::

    report = vqdoctor.inspect("ckpt.pt")          # ranked diagnosis of a checkpoint
    report.findings[0].id                          # e.g. "scale-mismatch"
    with vqdoctor.watch(model, run_dir="runs/vq") as doctor:   # live training
        ...; doctor.step(loss=loss)
    vqdoctor.report("runs/vq")                     # ranked diagnosis of a recorded run
    vqdoctor.load_run("runs/vq")                   # its per-step metrics (pandas)

`watch`, `report`, `load_run`, `register_adapter` and `LiveSpec` are imported on first use,
so `import vqdoctor` stays light.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"


def inspect(path: Any, *more: Any, **kwargs: Any):
    """Diagnose checkpoint(s); see `vqdoctor.diagnosis.inspect_checkpoints` for options.

    Args:
        path: a checkpoint file or folder, or a list of them (oldest first).
        *more: further checkpoints of the same run, oldest first.
        **kwargs: probe=, quantizers=, levels=, trust_checkpoint=, thresholds=.

    Returns:
        vqdoctor.report.Report
    """
    from vqdoctor.diagnosis import inspect_checkpoints

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    return inspect_checkpoints([*paths, *more], **kwargs)


def load_run(run_dir: Any):
    """Per-step metrics of a recorded run as a pandas DataFrame (`vqdoctor.watch.store.load_run`)."""
    from vqdoctor.watch.store import load_run as _load_run

    return _load_run(run_dir)


def register_adapter(cls_or_predicate: Any, fn: Any):
    """Teach the live watch a custom quantizer module (`vqdoctor.watch.live.register_adapter`)."""
    from vqdoctor.watch.live import register_adapter as _register

    return _register(cls_or_predicate, fn)


def _report(run_dir: Any, thresholds: Any = None):
    """Ranked diagnosis of a recorded run directory (`vqdoctor.diagnosis.report_run`).

    Args:
        run_dir: the run directory written by `vqdoctor.watch`.
        thresholds: per-rule threshold overrides.

    Returns:
        vqdoctor.report.Report
    """
    from vqdoctor.diagnosis import report_run

    return report_run(run_dir, thresholds)


class _ReportEntry:
    """`vqdoctor.report`: the run-report function, which also exposes the `vqdoctor.report` package.

    `vqdoctor.report` is both a function (SPEC: `vqdoctor.report("runs/vq")`) and the
    subpackage holding the Report model; importing the subpackage would rebind the name, so
    the package attribute is kept as this callable, which forwards attribute access to the
    subpackage (`vqdoctor.report.Report` still works).
    """

    __doc__ = _report.__doc__

    def __call__(self, run_dir: Any, thresholds: Any = None):
        return _report(run_dir, thresholds)

    def __getattr__(self, name: str) -> Any:
        import importlib

        return getattr(importlib.import_module("vqdoctor.report"), name)

    def __repr__(self) -> str:
        return "<function vqdoctor.report(run_dir, thresholds=None)>"


_REPORT = _ReportEntry()


class _Package(types.ModuleType):
    @property
    def report(self) -> _ReportEntry:
        return _REPORT

    @report.setter
    def report(self, value: Any) -> None:  # the import system binds the subpackage here: keep the function
        pass


def __getattr__(name: str) -> Any:
    if name in ("watch", "LiveSpec"):
        import importlib

        mod = importlib.import_module("vqdoctor.watch")  # a callable module: vqdoctor.watch(model, ...)
        return mod if name == "watch" else mod.LiveSpec
    raise AttributeError(f"module 'vqdoctor' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package

__all__ = ["LiveSpec", "__version__", "inspect", "load_run", "register_adapter", "report", "watch"]
