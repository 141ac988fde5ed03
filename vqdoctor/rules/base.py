"""Rule model: findings, evidence, rule specs and the registry.

Measurement stays apart from judgement: metrics produce named numbers (see
`vqdoctor.metrics.names`), rules turn them into `Finding`s using thresholds that are named
parameters. A rule never reads files and never prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Annotations only: pandas costs ~0.8 s of `import vqdoctor.cli`, and only run evidence
    # carries frames (the code that reads or builds them imports pandas itself).
    import pandas as pd


class Severity(str, Enum):
    """How bad a finding is. `error` and `warning` make a report unhealthy."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        """0 for error, 1 for warning, 2 for info (lower is worse)."""
        return {"error": 0, "warning": 1, "info": 2}[self.value]


def json_value(v: Any) -> Any:
    """Turn a metric value into a JSON-native one: NaN/Inf floats become None, numpy scalars Python."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if hasattr(v, "item") and not isinstance(v, (list, dict, tuple)):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class Finding:
    """One diagnosis line: a `findings[]` entry of the JSON report.

    Contract: docs/contract.md#the-json-report.

    Attributes:
        id: stable kebab-case failure-mode id, e.g. "scale-mismatch".
        code: stable code, e.g. "VQ003".
        severity: "error", "warning" or "info".
        confidence: 0..1, how sure the rule is that the mechanism is present.
        quantizer: name of the quantizer concerned, None for run-wide findings.
        step: first training step at which the condition held (run mode), else None.
        message: one line, with the key numbers.
        evidence: JSON-native numbers that support the message.
        fix: what to change, most effective first.
        caused_by: id of the root-cause finding that explains this symptom, filled by ranking.
    """

    id: str
    code: str
    severity: str
    confidence: float
    quantizer: str | None
    step: int | None
    message: str
    evidence: dict[str, Any]
    fix: str
    caused_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict in the report contract's key order."""
        return {
            "id": self.id, "code": self.code, "severity": self.severity,
            "confidence": round(float(self.confidence), 3), "quantizer": self.quantizer,
            "step": self.step, "message": self.message, "evidence": json_value(self.evidence),
            "fix": self.fix, "caused_by": self.caused_by,
        }


@dataclass
class QuantizerEvidence:
    """What the rules may look at for one quantizer.

    Attributes:
        name, kind, library, codebook_size, dim, heads, group, stage, metric, ema_rule: identity
            (see QuantizerState; ema_rule None: the library's Laplace-smoothed EMA, if any).
        metrics: scalar measurements by name (`vqdoctor.metrics.names`); a missing name means
            "not measured", and a rule that needs it stays silent.
        series: per-step measurements (run mode): a DataFrame indexed by step, one column per
            metric name; None for checkpoints.
        notes: plain-language caveats from discovery (e.g. "FSQ has no stored codebook").
    """

    name: str
    kind: str
    library: str
    codebook_size: int
    dim: int
    heads: int = 1
    group: str | None = None
    stage: int | None = None
    metric: str = "euclidean"
    ema_rule: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    series: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    def m(self, key: str, default: float | None = None) -> float | None:
        """A scalar metric, or `default` when it was not measured or is NaN."""
        v = self.metrics.get(key)
        if v is None:
            return default
        try:
            f = float(v)
        except (TypeError, ValueError):
            return default
        return default if math.isnan(f) else f


@dataclass
class Evidence:
    """Everything the rules see for one report.

    Attributes:
        source_kind: "checkpoint" or "run".
        quantizers: per-quantizer evidence.
        run: run-wide scalars (loss statistics, world size, ...).
        run_series: run-wide per-step values (loss, gradient norms), indexed by step; None for checkpoints.
    """

    source_kind: str
    quantizers: list[QuantizerEvidence]
    run: dict[str, float] = field(default_factory=dict)
    run_series: pd.DataFrame | None = None


@dataclass(frozen=True)
class RuleSpec:
    """Identity and documentation of one failure mode.

    Attributes:
        code: "VQ00N", never reused.
        id: kebab-case id, stable.
        title: one line under 80 characters.
        explains: ids of symptoms this mechanism can cause (used to fill `caused_by`).
        doc: markdown with sections: What it detects / Why it matters / Signals and thresholds /
            Fix / References.
    """

    code: str
    id: str
    title: str
    explains: tuple[str, ...]
    doc: str

    def finding(self, *, severity: Severity | str, confidence: float, quantizer: str | None,
                message: str, evidence: dict[str, Any], fix: str, step: int | None = None) -> Finding:
        """Build a finding of this rule."""
        sev = severity.value if isinstance(severity, Severity) else str(severity)
        return Finding(id=self.id, code=self.code, severity=sev,
                       confidence=max(0.0, min(1.0, float(confidence))), quantizer=quantizer,
                       step=None if step is None else int(step), message=message,
                       evidence=evidence, fix=fix)


CheckFn = Callable[[Evidence, Any], Iterable[Finding]]


@dataclass(frozen=True)
class Rule:
    """A registered rule: spec, threshold parameters (a frozen dataclass type) and the check."""

    spec: RuleSpec
    params: type
    check: CheckFn

    def run(self, ev: Evidence, overrides: dict[str, Any] | None = None) -> list[Finding]:
        """Run the check with default thresholds, updated by `overrides` (unknown keys raise)."""
        p = self.params()
        if overrides:
            names = {f.name for f in dataclasses.fields(p)}
            bad = sorted(set(overrides) - names)
            if bad:
                from vqdoctor.errors import ConfigError

                raise ConfigError(f"unknown threshold(s) {bad} for rule {self.spec.id}; "
                                  f"known: {sorted(names)}")
            p = dataclasses.replace(p, **overrides)
        return list(self.check(ev, p))

    def thresholds(self) -> dict[str, Any]:
        """Default thresholds by name."""
        return dataclasses.asdict(self.params())


_REGISTRY: dict[str, Rule] = {}


def rule(spec: RuleSpec, params: type) -> Callable[[CheckFn], CheckFn]:
    """Register a check function under `spec` with threshold dataclass `params`."""

    def deco(fn: CheckFn) -> CheckFn:
        if spec.id in _REGISTRY:
            raise ValueError(f"duplicate rule id {spec.id}")
        _REGISTRY[spec.id] = Rule(spec=spec, params=params, check=fn)
        return fn

    return deco


def registry() -> dict[str, Rule]:
    """All rules, by id, in code order."""
    from vqdoctor import rules as _rules  # noqa: F401  (imports every rule module)

    return dict(sorted(_REGISTRY.items(), key=lambda kv: kv[1].spec.code))


def iter_quantizers(ev: Evidence, *, kinds: Iterable[str] | None = None) -> Iterator[QuantizerEvidence]:
    """Quantizers of the given kinds (all when None)."""
    allowed = set(kinds) if kinds is not None else None
    for q in ev.quantizers:
        if allowed is None or q.kind in allowed:
            yield q
