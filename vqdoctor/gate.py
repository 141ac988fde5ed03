"""The CI gate: pass/fail checks of codebook health over a checkpoint or a recorded run.

    result = gate("runs/smoke")                                 # a run directory
    result = gate("model.ckpt", probe="z.pt")                   # a checkpoint (+ a probe)
    result = gate("runs/smoke", GateThresholds(min_usage=0.5))  # explicit thresholds
    result.passed, result.failures, result.report.diagnosis

Every gated quantizer gets one check per threshold (`min_perplexity`, `min_usage`,
`max_dead_fraction`) and a `findings` check (a finding at or above `fail_on` fails it); a run
also gets run-wide `training` and `findings` checks. A check passes, fails, or is skipped with the
reason (the metric cannot be measured, or the check is turned off). The gate never prints and
never exits: the CLI (`vqdoctor gate`) maps `GateResult.outcome` to exit codes 0 / 1 / 2.

Thresholds are scale-free, so one configuration fits any codebook size K and batch size:

- the perplexity floor may be relative (`"5%"`): a share of the codes the measurement can reach;
- usage and dead fractions are shares of K, and are scaled by the same reachable share when the
  measurement saw few tokens.

The codes a measurement can reach: n tokens drawn uniformly from K codes hit
`K * (1 - exp(-n / K))` distinct codes on average, and the perplexity of such a draw is of the
same size. EMA counts average many steps, so they reach all K. The usage window of a run and a
probe hold n = `window_tokens` / `probe_tokens` tokens.

Sources, per check: a run uses the windowed metrics of its last steps (`perplexity_window`,
`usage_window`, `dead_fraction`, over `window` steps, default the recorder's window). A
checkpoint uses its EMA counts (`perplexity`, `usage_fraction`, `dead_fraction`) and, with a
probe, the probe's assignments (`probe_*`); the check fails when either source fails and reports
the failing one (the probe first: it measures the current codebook on real inputs).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from vqdoctor.config import (
    FAIL_ON,
    GATE_KEYS,
    THRESHOLD_CHECKS,
    GateThresholds,
    PerplexityFloor,
    parse_threshold,
    resolve_gate_thresholds,
)
from vqdoctor.errors import InputError
from vqdoctor.metrics.usage import reachable_codes
from vqdoctor.numbers import fmt_exact as _fmt
from vqdoctor.numbers import fmt_share as _pct
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding, Severity, json_value

SCHEMA_VERSION = 1

# --- thresholds: parsed where all configuration is (`vqdoctor.config`) ---------------------------

# the gate's API keeps its names
resolve_thresholds = resolve_gate_thresholds


# --- results -----------------------------------------------------------------------------------


class Status(str, Enum):
    """Outcome of one check."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    """One check of one quantizer (or of the run: `quantizer` None).

    Attributes:
        quantizer: the quantizer's name ("" for a checkpoint that is the quantizer itself), or
            None for run-wide checks (`training`, run-wide `findings`).
        name: "min_perplexity", "min_usage", "max_dead_fraction", "findings" or "training".
        status: pass, fail or skip.
        message: one line: the measured value against the threshold, or why it was skipped.
        metric: the metric name the value was read from (e.g. "probe_perplexity"), if any.
        source: where it was measured: "EMA counts", "probe (2048 tokens)", "run, last 150
            steps", ...
        value: the measured value (findings: how many at or above fail_on; training: exit code).
        threshold: the effective threshold the value was compared with.
        threshold_spec: the threshold as configured (e.g. "5%").
        finding: the top finding for this quantizer (the diagnosis behind a failure), if any.
    """

    quantizer: str | None
    name: str
    status: Status
    message: str
    metric: str | None = None
    source: str | None = None
    value: float | None = None
    threshold: float | None = None
    threshold_spec: str | None = None
    finding: Finding | None = None

    @property
    def detail(self) -> str:
        """`metric, source` (e.g. "probe_perplexity, probe, 2048 tokens"), or ""."""
        return ", ".join(x for x in (self.metric, self.source) if x) if self.source else ""

    @property
    def subject(self) -> str:
        """Who is checked, for people: the quantizer's name, "(root)", or "run"."""
        if self.quantizer is None:
            return "run"
        return self.quantizer or "(root)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (the finding as its id and code)."""
        out: dict[str, Any] = {"quantizer": self.quantizer, "check": self.name,
                               "status": self.status.value, "message": self.message,
                               "metric": self.metric, "source": self.source,
                               "value": json_value(self.value),
                               "threshold": json_value(self.threshold),
                               "threshold_spec": self.threshold_spec}
        out["finding"] = ({"id": self.finding.id, "code": self.finding.code,
                           "severity": self.finding.severity} if self.finding else None)
        return out


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict over one target.

    Attributes:
        target: what was gated, for people (a path, several paths, or a command).
        kind: "checkpoint" or "run".
        thresholds: the resolved thresholds (before per-quantizer overrides).
        checks: every check, quantizers in report order, then the run-wide checks.
        report: the underlying ranked diagnosis.
        problems: why the analysis is incomplete (rule errors, nothing measurable); any makes the
            outcome "incomplete" unless a check failed.
        notes: things worth knowing (e.g. the window the records allowed).
        command: the training command, when the gate launched it (`gate -- CMD`).
        exit_code: that command's exit status.
    """

    target: str
    kind: str
    thresholds: GateThresholds
    checks: tuple[Check, ...]
    report: Report
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    exit_code: int | None = None

    @property
    def failures(self) -> list[Check]:
        """The failed checks, ranked: training first, then by the rank of their top finding."""
        rank = {id(f): i for i, f in enumerate(self.report.findings)}
        failed = [c for c in self.checks if c.status is Status.FAIL]
        order = {id(c): i for i, c in enumerate(failed)}

        def key(c: Check) -> tuple[int, int, int]:
            r = rank.get(id(c.finding), len(rank)) if c.finding is not None else len(rank)
            return (0 if c.name == "training" else 1, r, order[id(c)])

        return sorted(failed, key=key)

    @property
    def skipped(self) -> list[Check]:
        """The skipped checks."""
        return [c for c in self.checks if c.status is Status.SKIP]

    @property
    def passed(self) -> bool:
        """True when no check failed and the analysis is complete."""
        return self.outcome == "pass"

    @property
    def outcome(self) -> str:
        """"fail" (a check failed), "incomplete" (could not analyse fully), else "pass"."""
        if any(c.status is Status.FAIL for c in self.checks):
            return "fail"
        return "incomplete" if self.problems else "pass"

    @property
    def diagnosis(self) -> Finding | None:
        """The report's top finding (its diagnosis), if any."""
        return self.report.diagnosis

    def count(self, status: Status) -> int:
        """Number of checks with `status`."""
        return sum(1 for c in self.checks if c.status is status)

    def summary_line(self) -> str:
        """One line for stderr, e.g. "gate failed: 3 of 8 checks failed (diagnosis: dead-codes)"."""
        n, nf, ns = len(self.checks), self.count(Status.FAIL), self.count(Status.SKIP)
        skipped = f", {ns} skipped" if ns else ""
        if self.outcome == "fail":
            d = self.diagnosis
            tail = f" (diagnosis: {d.id})" if d else ""
            return f"gate failed: {nf} of {n} check{'s' * (n != 1)} failed{skipped}{tail}"
        if self.outcome == "incomplete":
            return f"gate could not analyse: {self.problems[0]}"
        return f"gate passed: {n - ns} of {n} check{'s' * (n != 1)} passed{skipped}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON gate result (`schema_version` 1), with the full report under `report`."""
        from vqdoctor import __version__

        return {"schema_version": SCHEMA_VERSION, "kind": "gate",
                "tool": {"name": "vqdoctor", "version": __version__},
                "outcome": self.outcome, "passed": self.passed, "target": self.target,
                "source_kind": self.kind, "thresholds": self.thresholds.to_dict(),
                "counts": {s.value: self.count(s) for s in Status},
                "checks": [c.to_dict() for c in self.checks],
                "failures": [c.to_dict() for c in self.failures],
                "command": list(self.command) if self.command is not None else None,
                "exit_code": self.exit_code, "problems": list(self.problems),
                "notes": list(self.notes), "report": self.report.to_dict()}


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str          # "EMA counts", "probe", "run"
    metrics: dict[str, str]  # check -> metric name
    tokens_key: str | None


_EMA = _Source("EMA counts", {"min_perplexity": "perplexity", "min_usage": "usage_fraction",
                              "max_dead_fraction": "dead_fraction"}, None)
_PROBE = _Source("probe", {"min_perplexity": "probe_perplexity",
                           "min_usage": "probe_usage_fraction",
                           "max_dead_fraction": "probe_dead_fraction"}, "probe_tokens")
_RUN = _Source("run", {"min_perplexity": "perplexity_window", "min_usage": "usage_window",
                       "max_dead_fraction": "dead_fraction"}, "window_tokens")


def _num(m: Mapping[str, Any], key: str | None) -> float | None:
    if key is None:
        return None
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _measure(check: str, q: QuantizerReport, src: _Source, th: GateThresholds,
             window_steps: float | None) -> tuple[Status, str, str, float, float, str] | None:
    """(status, message, source label, value, threshold, spec) of one check from one source."""
    metric = src.metrics[check]
    value = _num(q.metrics, metric)
    if value is None:
        return None
    K = float(q.info.get("codebook_size") or q.metrics.get("codebook_size") or 0)
    n = _num(q.metrics, src.tokens_key)
    reach = reachable_codes(K, n) if K > 0 else 0.0
    label = src.label
    if src is _PROBE and n is not None:
        label = f"probe, {_fmt(n)} tokens"
    elif src is _RUN:
        label = f"run, last {_fmt(window_steps)} steps" if window_steps else "run window"
        if n is not None:
            label += f", {_fmt(n)} tokens"
    scaled = K > 0 and reach < K * (1 - 1e-9)
    why = f" reachable with {_fmt(n)} tokens" if scaled and n is not None else ""
    if check == "min_perplexity":
        floor = th.min_perplexity
        assert floor is not None
        thr = floor.floor(reach)
        spec = str(floor)
        share = f"{floor.value * 100:g}%"
        least = f", at least {floor.minimum:g}" if floor.relative and floor.minimum else ""
        ctx = f" ({share} of {_fmt(round(reach, 1))} codes{least}{why})" if floor.relative else ""
        ok = value >= thr
        msg = f"perplexity {_fmt(value)} {'>=' if ok else '<'} {_fmt(thr)}{ctx}"
    elif check == "min_usage":
        assert th.min_usage is not None
        share = reach / K if K > 0 else 1.0
        thr = th.min_usage * share
        spec = _pct(th.min_usage)
        ctx = f" ({spec} of the {_pct(share)} of codes{why})" if scaled else ""
        ok = value >= thr
        msg = f"codes used {_pct(value)} {'>=' if ok else '<'} {_pct(thr)}{ctx}"
    else:
        assert th.max_dead_fraction is not None
        share = reach / K if K > 0 else 1.0
        thr = 1 - (1 - th.max_dead_fraction) * share
        spec = _pct(th.max_dead_fraction)
        ctx = f" ({spec}, allowing for the codes not{why})" if scaled else ""
        ok = value <= thr
        msg = f"codes dead {_pct(value)} {'<=' if ok else '>'} {_pct(thr)}{ctx}"
    if not math.isfinite(value):
        ok, msg = False, f"{metric} is not finite ({value})"
    return (Status.PASS if ok else Status.FAIL), msg, label, value, thr, spec


def _threshold_check(check: str, q: QuantizerReport, kind: str, th: GateThresholds,
                     has_probe: bool, window_steps: float | None,
                     finding: Finding | None) -> Check:
    spec = getattr(th, check)
    if spec is None:
        default_off = getattr(GateThresholds(), check) is None
        why = f"off (opt in: --{check.replace('_', '-')})" if default_off else "turned off by configuration"
        return Check(q.name, check, Status.SKIP, why, finding=finding)
    sources = [_RUN] if kind == "run" else ([_PROBE, _EMA] if has_probe else [_EMA])
    measured = [(src, r) for src in sources
                if (r := _measure(check, q, src, th, window_steps)) is not None]
    if not measured:
        return Check(q.name, check, Status.SKIP, _skip_reason(check, q, kind, has_probe),
                     threshold_spec=str(spec) if not isinstance(spec, float) else _pct(spec),
                     finding=finding)
    # the first failing source decides; else the first (the probe: the current codebook)
    src, (status, msg, label, value, thr, spec_txt) = next(
        (m for m in measured if m[1][0] is Status.FAIL), measured[0])
    return Check(q.name, check, status, msg, metric=src.metrics[check], source=label,
                 value=value, threshold=thr, threshold_spec=spec_txt, finding=finding)


def _skip_reason(check: str, q: QuantizerReport, kind: str, has_probe: bool) -> str:
    qkind = q.info.get("kind", "quantizer")
    if kind == "run":
        return (f"not measurable: the run recorded no usage window for this {qkind} "
                f"(no code indices seen, or too few steps)")
    if has_probe:
        return f"not measurable: no usage counts stored for this {qkind}, and the probe gave none"
    return (f"not measurable: no usage counts stored for this {qkind}; give --probe FILE "
            f"(encoder outputs) to measure usage on real inputs")


def _top_finding(report: Report, name: str | None) -> Finding | None:
    """The first error/warning finding of quantizer `name`, else the first run-wide one."""
    bad = (Severity.ERROR.value, Severity.WARNING.value)
    for f in report.findings:
        if f.severity in bad and f.quantizer == name:
            return f
    if name is not None:
        for f in report.findings:
            if f.severity in bad and f.quantizer is None:
                return f
    return None


def _at_or_above(f: Finding, fail_on: str) -> bool:
    return fail_on != "never" and Severity(f.severity).rank <= Severity(fail_on).rank


def _findings_check(report: Report, name: str | None, fail_on: str) -> Check:
    mine = [f for f in report.findings if f.quantizer == name]
    if fail_on == "never":
        return Check(name, "findings", Status.SKIP, "findings do not gate (--fail-on never)",
                     finding=_top_finding(report, name), threshold_spec="never")
    hits = [f for f in mine if _at_or_above(f, fail_on)]
    if not hits:
        worse = " or warning" if fail_on == "warning" else ""
        return Check(name, "findings", Status.PASS, f"no finding of severity error{worse}",
                     metric="findings", value=0.0, threshold=0.0, threshold_spec=fail_on,
                     finding=_top_finding(report, name))
    top = hits[0]
    more = f" (+{len(hits) - 1} more)" if len(hits) > 1 else ""
    return Check(name, "findings", Status.FAIL,
                 f"{top.code} {top.id} [{top.severity}]: {' '.join(top.message.split())}{more}",
                 metric="findings", value=float(len(hits)), threshold=0.0, threshold_spec=fail_on,
                 finding=top)


def _training_check(report: Report, command: Sequence[str] | None,
                    exit_code: int | None) -> Check | None:
    if exit_code is not None:
        cmd = " ".join(command or ()) or "the training"
        if exit_code == 0:
            return Check(None, "training", Status.PASS, f"{cmd} exited with code 0",
                         metric="exit_code", value=0.0, threshold=0.0)
        return Check(None, "training", Status.FAIL, f"the training failed: {cmd} exited with "
                     f"code {exit_code}", metric="exit_code", value=float(exit_code),
                     threshold=0.0)
    status = report.source.get("status")
    if status == "finished":
        return Check(None, "training", Status.PASS, "the recorded run finished")
    if status == "failed":
        return Check(None, "training", Status.FAIL,
                     "the training failed: the recorded run ended with status 'failed'")
    if status == "running":
        return Check(None, "training", Status.SKIP,
                     "the run is still being recorded (or its process was killed)")
    return None


# --- the gate ----------------------------------------------------------------------------------


def judge(report: Report, thresholds: GateThresholds | None = None, *, target: str = "",
          probe: bool = False, quantizers: Sequence[str] | None = None,
          command: Sequence[str] | None = None, exit_code: int | None = None) -> GateResult:
    """Judge a finished report on codebook health and findings (reads nothing itself).

    Args:
        report: the ranked diagnosis of a run (`source.kind` "run") or checkpoint(s); for a run
            gated over `thresholds.window` steps, a report made with that window
            (`diagnosis.report_run(..., window=N)`).
        thresholds: what to require (default `GateThresholds()`).
        target: what was gated, for people.
        probe: the report measured a probe (a second source for checkpoints).
        quantizers: fnmatch patterns: gate only quantizers whose name matches one (each pattern
            must match at least one).
        command: the training command, when the caller ran it (`gate -- CMD`).
        exit_code: that command's exit status; non-zero fails the `training` check.

    Raises:
        InputError: a pattern that matches no quantizer.
    """
    th = thresholds or GateThresholds()
    kind = "run" if report.source.get("kind") == "run" else "checkpoint"
    notes: list[str] = []
    window_note = (report.source.get("window") or {}).get("note")
    if window_note:
        notes.append(window_note)
    if kind == "checkpoint" and th.window is not None:
        notes.append("window ignored: a checkpoint has no steps")
    selected = list(report.quantizers)
    if quantizers:
        names = [q.name for q in report.quantizers]
        for pattern in quantizers:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise InputError(f"--quantizer {pattern!r} matches no quantizer; found: "
                                 f"{', '.join(n or '(root)' for n in names) or 'none'}")
        selected = [q for q in selected
                    if any(fnmatch.fnmatchcase(q.name, p) for p in quantizers)]

    checks: list[Check] = []
    measured = wanted = False  # some threshold check measured / was asked for
    window_steps: float | None = None
    for q in selected:
        qth = th.for_quantizer(q.name)
        top = _top_finding(report, q.name)
        if kind == "run":
            window_steps = _num(q.metrics, "window_steps")
        for name in THRESHOLD_CHECKS:
            c = _threshold_check(name, q, kind, qth, probe, window_steps, top)
            measured = measured or c.status is not Status.SKIP
            wanted = wanted or getattr(qth, name) is not None
            checks.append(c)
        checks.append(_findings_check(report, q.name, th.fail_on))
    if kind == "run" or any(f.quantizer is None for f in report.findings):
        checks.append(_findings_check(report, None, th.fail_on))
    training = _training_check(report, command, exit_code)
    if training is not None:
        checks.append(training)

    problems = [f"{len(report.errors)} diagnosis check{'s' * (len(report.errors) != 1)} "
                f"failed; the analysis is incomplete"] if report.errors else []
    if selected and wanted and not measured:
        problems.append("no threshold could be measured for any quantizer"
                        + ("" if kind == "run" or probe else "; give --probe FILE (encoder outputs)"))
    if not selected:
        problems.append("no quantizer to gate")
    return GateResult(target=target, kind=kind, thresholds=th, checks=tuple(checks), report=report,
                      problems=tuple(problems), notes=tuple(notes),
                      command=tuple(command) if command is not None else None,
                      exit_code=exit_code)


def gate(
    target: str | Path | Sequence[str | Path],
    thresholds: GateThresholds | None = None,
    *,
    probe: str | Path | None = None,
    quantizers: Sequence[str] | None = None,
    trust_checkpoint: bool = False,
    rule_thresholds: dict[str, dict[str, Any]] | None = None,
    command: Sequence[str] | None = None,
    exit_code: int | None = None,
    max_memory: int | str | None = None,
) -> GateResult:
    """Gate a run directory or checkpoint(s): `judge` of the report `diagnosis.report_target` makes.

    Args:
        target: a run directory, or checkpoint file(s)/folder(s) (several: one run, oldest first).
        thresholds: what to require (default `GateThresholds()`).
        probe: checkpoints: a tensor file of encoder outputs, measured as a second source.
        quantizers: fnmatch patterns: gate only quantizers whose name matches one.
        trust_checkpoint: allow full unpickling of checkpoints (runs code from the file).
        rule_thresholds: per-rule threshold overrides for the diagnosis.
        command: the training command, when the caller ran it (`gate -- CMD`).
        exit_code: that command's exit status; non-zero fails the `training` check.
        max_memory: checkpoints: memory budget for reading any one tensor (`vqdoctor inspect --max-memory`).

    Returns:
        The gate result (it never raises for a failed gate).

    Raises:
        VQDoctorError: the target cannot be analysed (missing, unreadable, no quantizer, bad
            probe, a pattern that matches no quantizer, a probe given for a run, ...).
    """
    from vqdoctor.diagnosis import report_target

    th = thresholds or GateThresholds()
    paths = [Path(target)] if isinstance(target, (str, Path)) else [Path(p) for p in target]
    report = report_target(paths, probe=probe, trust_checkpoint=trust_checkpoint,
                           thresholds=rule_thresholds, window=th.window, max_memory=max_memory)
    shown = " ".join(command) if command else " ".join(str(p) for p in paths)
    return judge(report, th, target=shown, probe=probe is not None, quantizers=quantizers,
                 command=command, exit_code=exit_code)


__all__ = ["FAIL_ON", "GATE_KEYS", "SCHEMA_VERSION", "THRESHOLD_CHECKS", "Check", "GateResult",
           "GateThresholds", "PerplexityFloor", "Status", "gate", "judge", "parse_threshold",
           "reachable_codes", "resolve_thresholds"]
