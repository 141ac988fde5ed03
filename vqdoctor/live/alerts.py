"""Alerts: the error and warning findings of a run being recorded, each kept at the earliest step
it was seen to hold. Shared by `vqdoctor.watch(...).alerts` and the live panel."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MESSAGE_CHARS = 90
"""Longest message an alert line shows (longer ones end in "...")."""


@dataclass(frozen=True)
class Alert:
    """A finding seen while the run was being recorded (error or warning).

    Attributes:
        id: failure-mode id, e.g. "dead-codes".
        code: e.g. "VQ005".
        severity: "error" or "warning".
        quantizer: quantizer name, None for run-wide findings.
        step: the step at which the condition first held.
        message: one line.
        confidence: 0..1.
        seen_at: the newest recorded step when it was first raised (None: not tracked).
    """

    id: str
    code: str
    severity: str
    quantizer: str | None
    step: int | None
    message: str
    confidence: float = 0.0
    seen_at: int | None = None

    def line(self) -> str:
        """`ALERT VQ005 dead-codes (quantizer) @step 120: message`."""
        where = f" ({self.quantizer})" if self.quantizer else ""
        at = f" @step {self.step}" if self.step is not None else ""
        msg = " ".join(self.message.split())
        if len(msg) > MESSAGE_CHARS:
            msg = msg[: MESSAGE_CHARS - 3] + "..."
        return f"ALERT {self.code} {self.id}{where}{at}: {msg}"


def merge(alerts: dict[tuple[str, str | None], Alert], findings: Iterable[Any],
          seen_at: int | None = None) -> list[Alert]:
    """Fold a report's error/warning findings into `alerts` (keyed by id and quantizer), keeping
    each at its earliest step; returns the alerts raised for the first time."""
    raised: list[Alert] = []
    for f in findings:
        if f.severity not in ("error", "warning"):
            continue
        key = (f.id, f.quantizer)
        old = alerts.get(key)
        if old is not None and (f.step is None or (old.step is not None and old.step <= f.step)):
            continue
        alerts[key] = Alert(f.id, f.code, f.severity, f.quantizer, f.step, f.message, f.confidence,
                            old.seen_at if old is not None else seen_at)
        if old is None:
            raised.append(alerts[key])
    return raised


def by_step(alerts: Iterable[Alert]) -> list[Alert]:
    """Alerts by the step they first held (run-wide ones without a step last)."""
    return sorted(alerts, key=lambda a: (a.step is None, a.step or 0, a.id))
