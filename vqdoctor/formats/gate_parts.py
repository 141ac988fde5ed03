"""Pieces of a gate result that several gate formats share: measured values and thresholds for
people, the one-line finding, the target line, the findings that did not gate.
"""

from __future__ import annotations

from vqdoctor.gate import Check, GateResult, Status
from vqdoctor.numbers import fmt_num, fmt_pct, one_line
from vqdoctor.rules.base import Finding, Severity

FRACTION_CHECKS = ("min_usage", "max_dead_fraction")
STATUS_LABEL = {Status.PASS: "pass", Status.FAIL: "FAIL", Status.SKIP: "skip"}
OUTCOME_TITLE = {"pass": "passed", "fail": "failed", "incomplete": "could not analyse"}


def measured(c: Check) -> str:
    """The measured value for people: a percentage for fractions, "2 findings", "exit 3"."""
    if c.value is None:
        return "n/a"
    if c.name in FRACTION_CHECKS:
        return fmt_pct(c.value)
    if c.name == "findings":
        n = int(c.value)
        return f"{n} finding{'s' * (n != 1)}"
    if c.name == "training":
        return f"exit {int(c.value)}"
    return fmt_num(c.value)


def threshold(c: Check) -> str:
    """The threshold for people: the effective value, with the configured one when it differs."""
    if c.name == "findings":
        return f"none at or above {c.threshold_spec}" if c.threshold_spec != "never" else "never"
    if c.name == "training":
        return "exit 0"
    if c.threshold is None:
        return c.threshold_spec or "n/a"
    op = ">=" if c.name.startswith("min_") else "<="
    shown = fmt_pct(c.threshold) if c.name in FRACTION_CHECKS else fmt_num(c.threshold)
    if c.threshold_spec and c.threshold_spec != shown:
        return f"{op} {shown} ({c.threshold_spec})"
    return f"{op} {shown}"


def finding_line(f: Finding) -> str:
    """`VQ005 dead-codes [error] quantizer: <message>` on one line."""
    where = "run" if f.quantizer is None else (f.quantizer or "(root)")
    return f"{f.code} {f.id} [{f.severity}] {where}: {one_line(f.message)}"


def target_line(result: GateResult) -> str:
    """`checkpoint smoke/checkpoint.pt · probe smoke/probe.pt` (or the command, or the run)."""
    src = result.report.source
    parts = [f"{result.kind} {result.target}" if result.command is None
             else f"command {result.target}"]
    if result.command is not None and src.get("paths"):
        parts.append(f"run {src['paths'][0]}")
    if src.get("probe"):
        parts.append(f"probe {src['probe']}")
    return " · ".join(parts)


def gate_warnings(result: GateResult) -> list[Finding]:
    """Findings of severity error or warning that did not gate (below `fail_on`), ranked."""
    fail_on = result.thresholds.fail_on
    names = {c.quantizer for c in result.checks}
    out = []
    for f in result.report.findings:
        if f.severity not in (Severity.ERROR.value, Severity.WARNING.value):
            continue
        if f.quantizer not in names and f.quantizer is not None:
            continue  # a quantizer left out with --quantizer
        if fail_on == "never" or Severity(f.severity).rank > Severity(fail_on).rank:
            out.append(f)
    return out


def top_findings(result: GateResult, limit: int = 3) -> list[Finding]:
    """The ranked error/warning findings of the gated quantizers (and run-wide), at most `limit`."""
    names = {c.quantizer for c in result.checks}
    bad = (Severity.ERROR.value, Severity.WARNING.value)
    return [f for f in result.report.findings
            if f.severity in bad and (f.quantizer is None or f.quantizer in names)][:limit]
