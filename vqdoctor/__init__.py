"""vqdoctor: tells you why your VQ codebook is collapsing.

Public API::

    report = vqdoctor.inspect("ckpt.pt")          # ranked diagnosis of a checkpoint
    report.findings[0].id                          # e.g. "scale-mismatch"
    with vqdoctor.watch(model, run_dir="runs/vq") as doctor:   # live training
        ...; doctor.step(loss=loss)
    vqdoctor.report("runs/vq")                     # ranked diagnosis of a recorded run
    vqdoctor.load_run("runs/vq")                   # its per-step metrics (pandas)

The functions import what they need when called, and the classes (`Doctor`, `LiveSpec`,
`Report`, `Finding`) load on first access, so `import vqdoctor` stays light. The subpackages
are named for what they hold (`checkpoint`, `quantizers`, `metrics`, `sources`, `rules`,
`results`, `formats`, `live`, `integrations`, `cli`), none after a function of this API.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vqdoctor.live.doctor import Doctor
    from vqdoctor.results.model import Report

__version__ = "0.1.0"


def inspect(path: Any, *more: Any, **kwargs: Any) -> Report:
    """Diagnose checkpoint(s); see `vqdoctor.diagnosis.inspect_checkpoints` for options.

    Args:
        path: a checkpoint file or folder, or a list of them (oldest first).
        *more: further checkpoints of the same run, oldest first.
        **kwargs: probe=, quantizers=, levels=, trust_checkpoint=, thresholds=.

    Returns:
        The ranked report.
    """
    from vqdoctor.diagnosis import inspect_checkpoints

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    return inspect_checkpoints([*paths, *more], **kwargs)


def watch(model: Any, run_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> Doctor:
    """Watch a model while it trains; use the result as a context manager.

    See `vqdoctor.live.doctor.watch` for the options (flush_every=, stats_every=, window=,
    quantizers=, tensorboard=, wandb=, exporters=, ...).

    Returns:
        The `Doctor`; hooks are attached on `__enter__` (or `start()`).
    """
    from vqdoctor.live.doctor import watch as _watch

    return _watch(model, run_dir, **kwargs)


def report(run_dir: str | os.PathLike[str], thresholds: dict[str, dict[str, Any]] | None = None,
           *, window: int | None = None) -> Report:
    """Ranked diagnosis of a recorded run directory (`vqdoctor.diagnosis.report_run`).

    Args:
        run_dir: the run directory written by `vqdoctor.watch`.
        thresholds: per-rule threshold overrides.
        window: report the windowed usage over the last `window` steps.
    """
    from vqdoctor.diagnosis import report_run

    return report_run(run_dir, thresholds, window=window)


def load_run(run_dir: str | os.PathLike[str]) -> Any:
    """Per-step metrics of a recorded run as a pandas DataFrame (`vqdoctor.live.store.load_run`)."""
    from vqdoctor.live.store import load_run as _load_run

    return _load_run(run_dir)


def register_adapter(cls_or_predicate: Any, fn: Any) -> Any:
    """Teach the live watch a custom quantizer module (`vqdoctor.live.discovery.register_adapter`)."""
    from vqdoctor.live.discovery import register_adapter as _register

    return _register(cls_or_predicate, fn)


_LAZY = {"Doctor": "vqdoctor.live.doctor", "LiveSpec": "vqdoctor.live.discovery",
         "Report": "vqdoctor.results.model", "Finding": "vqdoctor.rules.base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqdoctor' has no attribute {name!r}")


__all__ = ["Doctor", "Finding", "LiveSpec", "Report", "__version__", "inspect", "load_run",
           "register_adapter", "report", "watch"]
