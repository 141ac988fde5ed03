"""vqdoctor: tells you why your VQ codebook is collapsing.

Public API::

    report = vqdoctor.inspect("ckpt.pt")          # ranked diagnosis of a checkpoint
    report.findings[0].id                          # e.g. "scale-mismatch"
"""

from __future__ import annotations

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


__all__ = ["__version__", "inspect"]
