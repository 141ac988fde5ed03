"""Failure-mode rules (one module per failure-mode id, `vqNNN_<slug>.py`), registry and `run_rules`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from vqdoctor.rules.base import (
    Evidence,
    Finding,
    QuantizerEvidence,
    Rule,
    RuleSpec,
    Severity,
    registry,
    rule,
)
from vqdoctor.rules.ranking import rank

for _m in pkgutil.iter_modules(__path__):
    if _m.name.startswith("vq") and _m.name[2:5].isdigit():
        importlib.import_module(f"{__name__}.{_m.name}")


def run_rules(ev: Evidence, thresholds: dict[str, dict[str, Any]] | None = None,
             select: set[str] | None = None) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Run every rule over `ev` and rank the findings.

    Args:
        ev: the evidence.
        thresholds: per-rule overrides, keyed by rule id or code, e.g. {"dead-codes": {"warn_fraction": 0.3}}.
        select: rule ids or codes to run (all when None).

    Returns:
        (ranked findings, errors): a rule that raises becomes an error entry, never a crash.
    """
    from vqdoctor.errors import ConfigError

    thresholds = thresholds or {}
    rules = registry()
    by_code = {r.spec.code: rid for rid, r in rules.items()}
    unknown = [k for k in thresholds if k not in rules and k not in by_code]
    if unknown:
        raise ConfigError(f"unknown rule(s) in thresholds: {sorted(unknown)}")
    findings: list[Finding] = []
    errors: list[dict[str, Any]] = []
    for rid, r in rules.items():
        if select and rid not in select and r.spec.code not in select:
            continue
        overrides = {**thresholds.get(r.spec.code, {}), **thresholds.get(rid, {})}
        try:
            findings.extend(r.run(ev, overrides))
        except ConfigError:
            raise
        except Exception as e:  # a broken rule must not take the report down
            errors.append({"rule": rid, "code": r.spec.code,
                           "message": f"rule raised {type(e).__name__}: {e}"})
    groups = {q.name: q.group for q in ev.quantizers}
    stages = {q.name: q.stage for q in ev.quantizers}
    return rank(findings, rules, groups, stages), errors


__all__ = ["Evidence", "Finding", "QuantizerEvidence", "Rule", "RuleSpec", "Severity",
           "rank", "registry", "rule", "run_rules"]
