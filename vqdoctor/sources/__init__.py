"""Evidence sources: what a checkpoint or a recorded run shows, in the form the rules read.

A source turns its input into an `Observation`: the rules' `Evidence` (identity and metrics of
every quantizer, per-step series for runs), the quantizers as the report lists them, and the
report's `source` block. `vqdoctor.diagnosis.diagnose` turns any observation into a `Report`;
nothing after a source reads a file.

- `sources.checkpoint.observe_checkpoints`: one checkpoint, or several of one run (drift).
- `sources.run.observe_run`: a run directory's records (all ranks), optionally over a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vqdoctor.results.model import QuantizerReport, ReportSeries
from vqdoctor.rules.base import Evidence


@dataclass
class Observation:
    """What one source saw.

    Attributes:
        evidence: what the rules read.
        quantizers: the quantizers as the report lists them (their metrics are the evidence's).
        source: the report's `source` block (kind, paths, torch, ...).
        errors: checks that could not run before the rules (e.g. the watch's own errors).
        series: what the report's charts draw (`report.series`), None when not collected.
    """

    evidence: Evidence
    quantizers: list[QuantizerReport]
    source: dict[str, Any]
    errors: list[dict[str, Any]] = field(default_factory=list)
    series: ReportSeries | None = None


__all__ = ["Observation"]
