"""Rank findings: root causes first, each symptom after the cause that explains it.

Causal knowledge lives in each rule's `RuleSpec.explains` (cause -> symptoms it can produce).
When two findings could explain each other (e.g. loss divergence and non-finite values), the one
that held first (run mode) is the cause; without steps, `ROOT_ORDER` decides.
"""

from __future__ import annotations

import dataclasses

from vqdoctor.rules.base import Finding, Rule, Severity

# Most fundamental mechanism first. Used to break ties and mutual explanations.
ROOT_ORDER = (
    "rank-desync",
    "frozen-codebook",
    "no-encoder-gradient",
    "ema-divergence",
    "loss-divergence",
    "scale-mismatch",
    "replacement-churn",
    "non-finite",
    "codebook-redundancy",
    "dead-codes",
    "index-collapse",
)


def _order(fid: str) -> int:
    return ROOT_ORDER.index(fid) if fid in ROOT_ORDER else len(ROOT_ORDER)


def _in_scope(cause: Finding, symptom: Finding, groups: dict[str, str | None]) -> bool:
    """A cause explains a symptom on the same quantizer, in the same residual group, or run-wide."""
    if cause.quantizer is None or cause.quantizer == symptom.quantizer:
        return True
    if symptom.quantizer is None:
        return False
    g1, g2 = groups.get(cause.quantizer), groups.get(symptom.quantizer)
    return g1 is not None and g1 == g2


def _causes(a: Finding, b: Finding, explains: dict[str, tuple[str, ...]]) -> bool:
    """True when finding `a` should be taken as a cause of finding `b`."""
    if a.id == b.id or b.id not in explains.get(a.id, ()):
        return False
    if a.id in explains.get(b.id, ()):  # mutual: earliest onset wins, then ROOT_ORDER
        if a.step is not None and b.step is not None and a.step != b.step:
            return a.step < b.step
        return _order(a.id) < _order(b.id)
    return True


def _key(f: Finding) -> tuple:
    return (Severity(f.severity).rank, _order(f.id), -f.confidence, f.quantizer or "")


def rank(findings: list[Finding], rules: dict[str, Rule],
         groups: dict[str, str | None] | None = None) -> list[Finding]:
    """Return findings ranked root-cause first, with `caused_by` filled.

    Args:
        findings: unranked findings from all rules.
        rules: the registry (for `explains`).
        groups: quantizer name -> residual group name, so a cause on one stage explains symptoms
            on the other stages of the same quantizer.
    """
    groups = groups or {}
    explains = {rid: r.spec.explains for rid, r in rules.items()}
    ordered = sorted(findings, key=_key)
    parent: dict[int, int] = {}
    for i, f in enumerate(ordered):
        if f.severity == Severity.INFO.value:
            continue
        candidates = [j for j, g in enumerate(ordered)
                      if j != i and g.severity != Severity.INFO.value
                      and _in_scope(g, f, groups) and _causes(g, f, explains)]
        candidates.sort(key=lambda j: (_order(ordered[j].id), Severity(ordered[j].severity).rank,
                                       -ordered[j].confidence))
        for j in candidates:
            k, seen = j, {i}
            while k in parent and k not in seen:  # refuse an edge that would close a cycle
                seen.add(k)
                k = parent[k]
            if k not in seen:
                parent[i] = j
                break
    children: dict[int, list[int]] = {}
    for i, j in parent.items():
        children.setdefault(j, []).append(i)

    out: list[int] = []

    def emit(i: int) -> None:
        out.append(i)
        for c in sorted(children.get(i, []), key=lambda c: _key(ordered[c])):
            emit(c)

    roots = [i for i in range(len(ordered)) if i not in parent]
    for i in sorted(roots, key=lambda i: _key(ordered[i])):
        emit(i)
    return [dataclasses.replace(ordered[i], caused_by=ordered[parent[i]].id if i in parent else None)
            for i in out]
