"""Rank findings: root causes first, each symptom after the cause that explains it.

Causal knowledge lives in each rule's `RuleSpec.explains` (cause -> symptoms it can produce).
When two findings could explain each other (e.g. loss divergence and non-finite values), the one
that held first (run mode) is the cause; without steps, `ROOT_ORDER` decides.

Evidence can widen the graph for one finding: a finding whose `evidence["explains"]` lists ids
explains those findings too, and none of them can be its cause (index-collapse whose inputs have
no spread explains the dead codes beside it; without that evidence dead codes explain a collapse).

Severity follows impact: a cause takes the worst severity of the findings it explains (its own is
kept as `evidence["severity_own"]`), and chains are ordered by it.
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
    # Non-finite values poison every other measurement of their quantizer (a NaN codebook makes
    # counts, norms and replacements meaningless), so as an independent root they come first
    # among the rest; loss divergence and EMA divergence can cause them and stay above.
    "non-finite",
    "scale-mismatch",
    "replacement-churn",
    "codebook-redundancy",
    "dead-codes",
    "index-collapse",
)


def _order(fid: str) -> int:
    return ROOT_ORDER.index(fid) if fid in ROOT_ORDER else len(ROOT_ORDER)


def _in_scope(cause: Finding, symptom: Finding, groups: dict[str, str | None],
              stages: dict[str, int | None] | None = None) -> bool:
    """A cause explains a symptom on the same quantizer, on an earlier stage of the same residual
    group, or run-wide.

    Run-wide works both ways: a run-wide cause (loss divergence) explains any quantizer's
    symptoms, and a run-wide symptom (the loss) can be explained by any quantizer's mechanism
    (a scale mismatch whose commitment term grows with ||z||). Within a residual group the
    influence runs one way: stage j quantizes what stages < j left over, so a mechanism on
    stage i can explain symptoms on stages >= i, never on an earlier stage (whose input does
    not depend on it).
    """
    if cause.quantizer is None or symptom.quantizer is None or cause.quantizer == symptom.quantizer:
        return True
    g1, g2 = groups.get(cause.quantizer), groups.get(symptom.quantizer)
    if g1 is None or g1 != g2:
        return False
    s1, s2 = (stages or {}).get(cause.quantizer), (stages or {}).get(symptom.quantizer)
    return s1 is None or s2 is None or s1 <= s2


def _distance(cause: Finding, symptom: Finding) -> int:
    """0 for a cause on the symptom's own quantizer (or run-wide), 1 for another stage."""
    same = cause.quantizer is None or symptom.quantizer is None or cause.quantizer == symptom.quantizer
    return 0 if same else 1


def _declared(f: Finding) -> tuple[str, ...]:
    """Ids this finding's evidence says it explains (`evidence["explains"]`), beyond its rule's."""
    ids = f.evidence.get("explains") if isinstance(f.evidence, dict) else None
    return tuple(x for x in ids if isinstance(x, str)) if isinstance(ids, (list, tuple)) else ()


def _causes(a: Finding, b: Finding, explains: dict[str, tuple[str, ...]]) -> bool:
    """True when finding `a` should be taken as a cause of finding `b`."""
    if a.id == b.id:
        return False
    if b.id in _declared(a):  # evidence-level explanation: overrides the static graph
        return True
    if a.id in _declared(b):
        return False
    if b.id not in explains.get(a.id, ()):
        return False
    if a.id in explains.get(b.id, ()):  # mutual: earliest onset wins, then ROOT_ORDER
        if a.step is not None and b.step is not None and a.step != b.step:
            return a.step < b.step
        return _order(a.id) < _order(b.id)
    return True


def _ancestors(parent: dict[int, int], i: int) -> list[int]:
    """Causes above finding `i`, nearest first (stops at a repeat, so never loops)."""
    out: list[int] = []
    while i in parent and parent[i] not in out and parent[i] != i:
        i = parent[i]
        out.append(i)
    return out


def _closes_cycle(parent: dict[int, int], child: int, cause: int) -> bool:
    """True when making `cause` the parent of `child` would close a cycle."""
    return cause == child or child in _ancestors(parent, cause)


def _key(f: Finding) -> tuple:
    return (Severity(f.severity).rank, _order(f.id), -f.confidence, f.quantizer or "")


def rank(findings: list[Finding], rules: dict[str, Rule],
         groups: dict[str, str | None] | None = None,
         stages: dict[str, int | None] | None = None) -> list[Finding]:
    """Return findings ranked root-cause first, with `caused_by` filled.

    Args:
        findings: unranked findings from all rules.
        rules: the registry (for `explains`).
        groups: quantizer name -> residual group name, so a cause on one stage explains symptoms
            on the later stages of the same quantizer.
        stages: quantizer name -> stage index within its group (None or absent: unknown, and
            then any stage of the group may explain any other).
    """
    groups = groups or {}
    explains = {rid: r.spec.explains for rid, r in rules.items()}
    ordered = sorted(findings, key=_key)
    parent: dict[int, int] = {}
    options: dict[int, list[int]] = {}
    for i, f in enumerate(ordered):
        # an info note (partial usage, say) is explained like any symptom, but never explains one
        candidates = [j for j, g in enumerate(ordered)
                      if j != i and g.severity != Severity.INFO.value
                      and _in_scope(g, f, groups, stages) and _causes(g, f, explains)]
        # The symptom's own quantizer first: a mechanism seen on the very stage explains it more
        # directly than the same mechanism on an earlier stage of its group.
        candidates.sort(key=lambda j: (_distance(ordered[j], f), _order(ordered[j].id),
                                       Severity(ordered[j].severity).rank, -ordered[j].confidence))
        options[i] = candidates
        for j in candidates:
            if not _closes_cycle(parent, i, j):
                parent[i] = j
                break
    # Prefer the nearest explanation under the same root: when a symptom's chosen cause also
    # explains another candidate cause (scale-mismatch -> dead-codes), hang the symptom under
    # that intermediate, so the report reads as a chain rather than siblings.
    for i in list(parent):
        chained = [d for d in options.get(i, []) if d != parent[i]
                   and parent[i] in _ancestors(parent, d) and not _closes_cycle(parent, i, d)]
        if chained:
            parent[i] = max(chained, key=lambda d: len(_ancestors(parent, d)))
    children: dict[int, list[int]] = {}
    for i, j in parent.items():
        children.setdefault(j, []).append(i)

    # Severity follows impact: a cause is at least as severe as the worst finding it explains
    # (dead codes that leave one code in use are the error their collapse is).
    worst: dict[int, int] = {}

    def impact(i: int, seen: frozenset[int] = frozenset()) -> int:
        if i not in worst:
            own = Severity(ordered[i].severity).rank
            worst[i] = min([own, *(impact(c, seen | {i}) for c in children.get(i, []) if c not in seen)])
        return worst[i]

    def key(i: int) -> tuple:
        return (impact(i), *_key(ordered[i])[1:])

    out: list[int] = []

    def emit(i: int) -> None:
        out.append(i)
        for c in sorted(children.get(i, []), key=key):
            emit(c)

    roots = [i for i in range(len(ordered)) if i not in parent]
    for i in sorted(roots, key=key):
        emit(i)
    return [_raised(ordered[i], impact(i), ordered[parent[i]].id if i in parent else None) for i in out]


def _raised(f: Finding, rank: int, caused_by: str | None) -> Finding:
    """`f` with `caused_by` set and its severity raised to `rank` (said in its evidence)."""
    if rank >= Severity(f.severity).rank:
        return dataclasses.replace(f, caused_by=caused_by)
    sev = next(s for s in Severity if s.rank == rank)
    evidence = {**f.evidence, "severity_own": f.severity} if isinstance(f.evidence, dict) else f.evidence
    return dataclasses.replace(f, caused_by=caused_by, severity=sev.value, evidence=evidence)
