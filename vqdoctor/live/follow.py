"""Following a run directory while it is recorded: the latest values and the live alerts.

`WatchPanel` reads the run directory only (`store.StoreTail`, the store's one reader, over a
bounded history), so it works the same over a training in this process (the demo), a child
process (`vqdoctor watch -- CMD`) and a run recorded elsewhere (`vqdoctor watch RUN_DIR`). Every
few seconds it runs the rules over the records so far (`vqdoctor.diagnosis.report_records`)
and raises an **alert** for each finding of severity error or warning, with the step at which
it first held; an alert keeps the earliest step it was ever seen at. How it is shown (a pinned
terminal panel, plain lines) is the command line's business (`vqdoctor.cli.panel`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vqdoctor.live.alerts import Alert, by_step, merge
from vqdoctor.live.store import StoreTail
from vqdoctor.numbers import as_float, fmt_compact

# Steps of records the panel's rules judge: a bound on each check's cost (as the Doctor's alerts).
HISTORY_STEPS = 10_000


class WatchPanel:
    """The state behind every display: latest values per quantizer, the loss, alerts.

    Args:
        run_dir: the run directory.
        rules_every: seconds between two runs of the rules, stretched to 10x the time the last
            run took, so a long run never spends more than a tenth of its time diagnosing (0:
            at every refresh that brought new records, unstretched).
        thresholds: rule threshold overrides, as for `vqdoctor.report`.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, rules_every: float = 3.0,
                 thresholds: dict[str, dict[str, Any]] | None = None):
        self.tail = StoreTail(run_dir, keep_steps=HISTORY_STEPS)
        self.run_dir = Path(run_dir)
        self.rules_every = float(rules_every)
        self.thresholds = thresholds
        self.infos: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, dict[str, float]] = {}
        self.step: int | None = None
        self.loss: float | None = None
        self.alerts: dict[tuple[str, str | None], Alert] = {}
        self.errors: list[str] = []
        self.last_report: Any = None
        self._report_state: tuple | None = None
        self._rules_at = 0.0
        self._rules_cost = 0.0
        self._dirty = False
        self._rules_failed = False

    # ------------------------------------------------------------------ state

    @property
    def status(self) -> str:
        """meta.json's status ("running", "finished", "failed"), "waiting" before it exists."""
        return str(self.tail.meta.get("status") or "waiting")

    @property
    def recorded(self) -> bool:
        """True once any rank's stream holds a record."""
        return any(self.tail.streams.values())

    @property
    def world_size(self) -> int:
        """Ranks seen (meta's world size, or the number of streams)."""
        return max(int(self.tail.meta.get("world_size") or 1), len(self.tail.streams), 1)

    def refresh(self, *, rules: bool | None = None) -> list[Alert]:
        """Read new records; run the rules when due (or when `rules` is True).

        Returns:
            Alerts raised by this refresh (findings not alerted before; an alert seen again with
            an earlier first step is updated in place, not raised again).
        """
        new = self.tail.poll()
        shown = min(self.tail.streams) if self.tail.streams else 0
        for rank, rec in new:
            t = rec.get("t")
            if t == "start":
                for q in rec.get("quantizers") or []:
                    if isinstance(q, dict) and "name" in q:
                        self.infos[str(q["name"])] = q
                if rank == shown:  # a new session in this directory: start over
                    self.latest, self.step, self.loss, self.alerts = {}, None, None, {}
                continue
            if rank != shown:
                continue
            step = rec.get("step")
            if t == "step" and isinstance(step, int):
                name = str(rec.get("q"))
                cur = self.latest.setdefault(name, {})
                for k, v in rec.items():
                    x = as_float(v)
                    if x is not None and k not in ("step",):
                        cur[k] = x
                cur["step"] = float(step)
                self.step = step if self.step is None else max(self.step, step)
            elif t == "run" and isinstance(step, int):
                x = as_float(rec.get("loss"))
                if x is not None:
                    self.loss = x
                self.step = step if self.step is None else max(self.step, step)
        if new:
            self._dirty = True
        for q in self.tail.meta.get("quantizers") or []:
            if isinstance(q, dict) and "name" in q:
                self.infos.setdefault(str(q["name"]), q)
        stretch = 10 * self._rules_cost if self.rules_every > 0 else 0.0
        due = time.monotonic() - self._rules_at >= max(self.rules_every, stretch)
        if rules or (rules is None and self._dirty and due):
            return self._run_rules()
        return []

    def _run_rules(self) -> list[Alert]:
        self._dirty = False
        self._rules_at = time.monotonic()
        if not self.recorded or self._rules_failed:
            return []
        try:  # imported before the clock starts: a one-time cost must not stretch every wait
            from vqdoctor.diagnosis import report_records as build_report
        except Exception as e:
            self._rules_failed = True
            self.errors.append(f"alerts unavailable ({type(e).__name__}: {e})")
            return []
        t0 = time.perf_counter()
        try:
            report = build_report(self.tail.meta, self.tail.streams, [str(self.run_dir)],
                                  self.thresholds)
        except Exception as e:  # the panel must never stop the training or the report
            self._rules_failed = True
            self.errors.append(f"alerts unavailable ({type(e).__name__}: {e})")
            return []
        finally:
            self._rules_cost = time.perf_counter() - t0
        self.last_report = report
        self._report_state = self.tail.state()
        return merge(self.alerts, report.findings, self.step)

    def current_report(self) -> Any:
        """The report of the last rules run when nothing was written since (else None): the
        launcher's final report without diagnosing the same records twice."""
        if self.last_report is None or self._report_state is None or self.tail.trimmed:
            return None  # (a trimmed tail judged the recent steps only, not the whole run)
        return self.last_report if self.tail.state(on_disk=True) == self._report_state else None

    def sorted_alerts(self) -> list[Alert]:
        """Alerts by the step they first held (run-wide ones without a step last)."""
        return by_step(self.alerts.values())

    # ------------------------------------------------------------------ views

    def _codebook_size(self, name: str) -> int | None:
        k = self.infos.get(name, {}).get("codebook_size")
        return int(k) if isinstance(k, (int, float)) and k else None

    def quantizer_summary(self, name: str) -> str:
        """`name: ppl 12.3/512 usage 41% dead 55% scale 1.02`."""
        m = self.latest.get(name, {})
        k = self._codebook_size(name)
        parts = [f"{name}: ppl {fmt_compact(m.get('perplexity'))}" + (f"/{k}" if k else "")]
        if "usage_window" in m:
            parts.append(f"usage {fmt_compact(m['usage_window'], pct=True)}")
        if "dead_fraction" in m:
            parts.append(f"dead {fmt_compact(m['dead_fraction'], pct=True)}")
        if "scale_ratio" in m:
            parts.append(f"scale {fmt_compact(m['scale_ratio'])}")
        return " ".join(parts)

    def status_line(self) -> str:
        """One line: the newest step, each quantizer (up to a few), the loss."""
        if not self.recorded:
            return "waiting for the first records ..."
        names = list(self.latest)
        segs = [self.quantizer_summary(n) for n in names[:4]]
        if len(names) > 4:
            segs.append(f"(+{len(names) - 4} more)")
        line = f"step {self.step if self.step is not None else '-'}  " + "  ".join(segs)
        if self.loss is not None:
            line += f"  loss {fmt_compact(self.loss)}"
        return line


__all__ = ["HISTORY_STEPS", "WatchPanel"]
