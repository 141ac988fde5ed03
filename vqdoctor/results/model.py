"""The report: what every output format renders. JSON contract: docs/contract.md#the-json-report.

Besides the ranked findings a report carries what its charts need (`ReportSeries`: metrics
over steps, the rank-frequency curve, code-norm histograms, per-head usage) and, per quantizer,
published reference values; both are collected by `vqdoctor.results.series` and
`vqdoctor.results.reference` when the report is built, so a format never reads anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vqdoctor.rules.base import Finding, Severity, json_value

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class QuantizerReport:
    """One quantizer as reported: identity (`describe()` of the normal form) and metrics.

    Attributes:
        info: JSON-native identity: name, kind, library, codebook_size, dim, heads, ...
        metrics: scalar metrics by name.
        histogram: code usage as fractions of K in a few buckets, or counts per code bin, for the
            small usage chart; empty when there are no counts.
        notes: caveats for the user.
        reference: published figures for this kind of quantizer and codebook size (info, not
            judgement): dicts with model, codebook_size, utilization / perplexity, source.
    """

    info: dict[str, Any]
    metrics: dict[str, Any]
    histogram: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The quantizer's name."""
        return str(self.info.get("name", ""))

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict: the identity keys, then `metrics`, `histogram`, `notes`."""
        out = dict(json_value(self.info))
        out["metrics"] = json_value(self.metrics)
        if self.histogram:
            out["histogram"] = json_value(self.histogram)
        if self.notes:
            out["notes"] = list(self.notes)
        if self.reference:
            out["reference"] = json_value(self.reference)
        return out


@dataclass(frozen=True)
class QuantizerSeries:
    """What the charts of one quantizer show (JSON-native values only).

    Attributes:
        steps: the steps of `metrics` (ascending); empty for a single checkpoint.
        metrics: metric name -> one value per step (None where it was not measured), e.g.
            perplexity, usage_window, dead_fraction, scale_ratio.
        rank_frequency: {"rank": [1-based ranks], "share": [share of assignments]} of the codes
            sorted by use (ranks thinned on a log scale), or {} without counts.
        code_norms: {"edges": [...], "counts": [...]}: histogram of the code vectors' norms, or {}.
        head_usage: {"steps": [...], "heads": H, "usage": [[per head] per step]}: share of each
            head's codes used over the window, or {} for a single head.
    """

    steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float | None]] = field(default_factory=dict)
    rank_frequency: dict[str, list[float]] = field(default_factory=dict)
    code_norms: dict[str, list[float]] = field(default_factory=dict)
    head_usage: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict of the non-empty parts."""
        out: dict[str, Any] = {}
        if self.steps:
            out["steps"] = list(self.steps)
            out["metrics"] = json_value(self.metrics)
        for key in ("rank_frequency", "code_norms", "head_usage"):
            if getattr(self, key):
                out[key] = json_value(getattr(self, key))
        return out


@dataclass(frozen=True)
class ReportSeries:
    """The report's chart data: per-quantizer series and the run-wide ones (loss, gradient norms).

    Attributes:
        quantizers: quantizer name -> its series.
        run: {"steps": [...], <metric>: [...]} run-wide values over steps, or {}.
    """

    quantizers: dict[str, QuantizerSeries] = field(default_factory=dict)
    run: dict[str, list[Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict: {"run": ..., "quantizers": {name: ...}}."""
        return {"run": json_value(self.run),
                "quantizers": {k: v.to_dict() for k, v in self.quantizers.items()}}


@dataclass(frozen=True)
class Report:
    """A ranked diagnosis.

    Attributes:
        source: {"kind": "checkpoint"|"run", "paths": [...], "torch": version, "safe_load": bool, ...}.
        quantizers: what was found, in discovery order.
        findings: ranked, root cause first.
        errors: problems that made the analysis incomplete (e.g. a rule that raised), as
            {"code"/"id"/"where": ..., "message": ...} dicts.
        tool_version: vqdoctor version.
        series: what the charts show (None for a hand-built report).
    """

    source: dict[str, Any]
    quantizers: list[QuantizerReport]
    findings: list[Finding]
    errors: list[dict[str, Any]] = field(default_factory=list)
    tool_version: str = ""
    series: ReportSeries | None = None

    @property
    def verdict(self) -> str:
        """"failing" with any error finding, "warning" with any warning, else "healthy"."""
        sev = {f.severity for f in self.findings}
        if Severity.ERROR.value in sev:
            return "failing"
        if Severity.WARNING.value in sev:
            return "warning"
        return "healthy"

    @property
    def diagnosis(self) -> Finding | None:
        """The first finding of severity error or warning: the diagnosis. None when healthy."""
        for f in self.findings:
            if f.severity in (Severity.ERROR.value, Severity.WARNING.value):
                return f
        return None

    def count(self, severity: str) -> int:
        """Number of findings of one severity."""
        return sum(1 for f in self.findings if f.severity == severity)

    def exceeds(self, fail_on: str) -> bool:
        """True when a finding is at or above `fail_on` ("error", "warning"; "never" is never)."""
        if fail_on == "never":
            return False
        limit = Severity(fail_on).rank
        return any(Severity(f.severity).rank <= limit for f in self.findings)

    def summary_line(self) -> str:
        """One line for stderr, e.g. "failing: 2 errors, 1 warning in 3 quantizers (scale-mismatch)"."""
        e, w = self.count("error"), self.count("warning")
        nq = len(self.quantizers)
        if e == w == 0 and self.errors:
            n = len(self.errors)
            return (f"incomplete: no problems found, but {n} check{'s' * (n != 1)} could not run "
                    f"({_one_line(self.errors[0])})")
        if e == w == 0:
            return f"healthy: no problems found in {nq} quantizer{'s' * (nq != 1)}"
        parts = [f"{e} error{'s' * (e != 1)}", f"{w} warning{'s' * (w != 1)}"]
        head = f"{self.verdict}: {', '.join(parts)} in {nq} quantizer{'s' * (nq != 1)}"
        d = self.diagnosis
        return f"{head} (diagnosis: {d.id})" if d else head

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (schema_version 1, docs/contract.md#the-json-report); `series` only when
        collected."""
        out = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "vqdoctor", "version": self.tool_version},
            "source": json_value(self.source),
            "verdict": self.verdict,
            "quantizers": [q.to_dict() for q in self.quantizers],
            "findings": [f.to_dict() for f in self.findings],
            "errors": json_value(self.errors),
            "complete": not self.errors,
        }
        if self.series is not None:
            out["series"] = self.series.to_dict()
        return out


def _one_line(error: dict[str, Any]) -> str:
    """The message of an error entry, shortened for a summary line."""
    msg = " ".join(str(error.get("message", "")).split())
    return msg if len(msg) <= 120 else msg[:117] + "..."
