"""Ranking: root cause first, caused_by chains, scope, mutual explanation by onset, rule errors."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from rules_kit import checkpoint, ema_step, gen, measured, state

from vqdoctor.rules import Finding, registry, rule, run_rules
from vqdoctor.rules.base import _REGISTRY, RuleSpec
from vqdoctor.rules.ranking import rank

RULES = registry()


def f(rid: str, quantizer: str | None = "q", *, severity: str = "error", step: int | None = None,
      confidence: float = 0.8) -> Finding:
    return RULES[rid].spec.finding(severity=severity, confidence=confidence, quantizer=quantizer,
                                   message=rid, evidence={}, fix="", step=step)


def chain(findings: list[Finding]) -> list[tuple[str, str | None]]:
    return [(x.id, x.caused_by) for x in findings]


def test_scale_mismatch_dead_codes_index_collapse_read_as_a_chain():
    found = [f("index-collapse"), f("dead-codes", severity="warning"), f("scale-mismatch")]
    assert chain(rank(found, RULES)) == [("scale-mismatch", None),
                                         ("dead-codes", "scale-mismatch"),
                                         ("index-collapse", "dead-codes")]


def test_mutual_explanation_resolved_by_earliest_onset():
    early_scale = [f("loss-divergence", None, step=50), f("scale-mismatch", step=10)]
    assert chain(rank(early_scale, RULES)) == [("scale-mismatch", None),
                                               ("loss-divergence", "scale-mismatch")]
    early_loss = [f("loss-divergence", None, step=10), f("scale-mismatch", step=50)]
    assert chain(rank(early_loss, RULES)) == [("loss-divergence", None),
                                              ("scale-mismatch", "loss-divergence")]


def test_mutual_explanation_without_steps_follows_root_order():
    found = [f("scale-mismatch"), f("loss-divergence", None)]
    assert chain(rank(found, RULES))[0] == ("loss-divergence", None)


def test_run_wide_cause_explains_every_quantizer():
    found = [f("dead-codes", "q1"), f("index-collapse", "q2"), f("loss-divergence", None)]
    ranked = rank(found, RULES)
    assert ranked[0].id == "loss-divergence"
    assert {x.caused_by for x in ranked[1:]} == {"loss-divergence"}


def test_quantizer_mechanism_explains_a_run_wide_symptom():
    # q1's scale mismatch came first and drove the loss up; q2 drifted only after the loss did
    found = [f("scale-mismatch", "q2", step=50), f("loss-divergence", None, step=30),
             f("scale-mismatch", "q1", step=10)]
    assert [(x.quantizer, x.caused_by) for x in rank(found, RULES)] == [
        ("q1", None), (None, "scale-mismatch"), ("q2", "loss-divergence")]


def test_residual_group_scope():
    groups = {"rvq.layers.0": "rvq", "rvq.layers.1": "rvq", "other": None}
    found = [f("ema-divergence", "rvq.layers.0"), f("dead-codes", "rvq.layers.1"),
             f("dead-codes", "other")]
    by_q = {x.quantizer: x.caused_by for x in rank(found, RULES, groups)}
    assert by_q == {"rvq.layers.0": None, "rvq.layers.1": "ema-divergence", "other": None}


def test_residual_stages_explain_downstream_only_and_own_stage_first():
    # encodec RVQ without k-means: stage 1 blew up, stage 0 has dead codes of its own. Stage 0
    # never sees stage 1, so stage 1's mechanism cannot explain it.
    groups = {"rvq.layers.0": "rvq", "rvq.layers.1": "rvq"}
    stages = {"rvq.layers.0": 0, "rvq.layers.1": 1}
    found = [f("ema-divergence", "rvq.layers.1"), f("dead-codes", "rvq.layers.0"),
             f("dead-codes", "rvq.layers.1")]
    ranked = rank(found, RULES, groups, stages)
    by_q = {(x.id, x.quantizer): x.caused_by for x in ranked}
    assert by_q[("dead-codes", "rvq.layers.0")] is None
    assert by_q[("dead-codes", "rvq.layers.1")] == "ema-divergence"
    # both stages blew up: each stage's symptom hangs under its own stage's cause
    found = [f("ema-divergence", "rvq.layers.0"), f("ema-divergence", "rvq.layers.1"),
             f("dead-codes", "rvq.layers.1")]
    ranked = rank(found, RULES, groups, stages)
    order = [(x.id, x.quantizer) for x in ranked]
    assert order.index(("dead-codes", "rvq.layers.1")) == order.index(("ema-divergence", "rvq.layers.1")) + 1
    # without stages the old behaviour holds: any stage of the group may explain any other
    assert rank([f("ema-divergence", "rvq.layers.1"), f("dead-codes", "rvq.layers.0")], RULES,
                groups)[1].caused_by == "ema-divergence"


def test_info_findings_come_last_and_explain_nothing():
    found = [f("rank-desync", severity="info"), f("dead-codes", severity="warning"),
             f("index-collapse")]
    ranked = rank(found, RULES)
    assert chain(ranked) == [("dead-codes", None), ("index-collapse", "dead-codes"),
                             ("rank-desync", None)]


def test_a_cause_takes_the_severity_of_what_it_explains():
    # 63 of 64 codes dead is a warning on its own; the collapse it explains is an error
    ranked = rank([f("index-collapse", severity="error"), f("dead-codes", severity="warning"),
                   f("codebook-redundancy", "q1", severity="warning")], RULES)
    assert [(x.id, x.severity) for x in ranked] == [
        ("dead-codes", "error"), ("index-collapse", "error"), ("codebook-redundancy", "warning")]
    assert ranked[0].evidence["severity_own"] == "warning"
    assert "severity_own" not in ranked[1].evidence


@pytest.mark.parametrize("seed", range(20))
def test_no_cycles_and_nothing_lost(seed):
    rnd = random.Random(seed)
    ids = list(RULES)
    found = [f(rnd.choice(ids), rnd.choice(["q0", "q1", None]),
               severity=rnd.choice(["error", "warning", "info"]),
               step=rnd.choice([None, 0, 10, 10, 50])) for _ in range(12)]
    ranked = rank(found, RULES, {"q0": "g", "q1": "g"})
    assert ranked == rank(found, RULES, {"q0": "g", "q1": "g"})  # deterministic
    own = lambda x: x.evidence.get("severity_own", x.severity)  # noqa: E731
    key = lambda x: repr((x.id, x.quantizer, x.step, own(x)))  # noqa: E731
    assert sorted(map(key, ranked)) == sorted(map(key, found))  # nothing lost or duplicated
    # a cause is at least as severe as what it explains; raised only then
    rank_of = {"error": 0, "warning": 1, "info": 2}
    for x in ranked:
        kids = [y for y in ranked if y.caused_by == x.id]
        if own(x) != x.severity:
            assert any(rank_of[y.severity] == rank_of[x.severity] for y in kids), chain(ranked)
    # every finding's cause appears before it: the caused_by graph is a forest, ranked top-down
    for i, x in enumerate(ranked):
        if x.caused_by is not None:
            assert any(y.id == x.caused_by and y.severity != "info" for y in ranked[:i]), chain(ranked)


def test_a_raising_rule_becomes_an_error_entry():
    spec = RuleSpec(code="VQ999", id="broken-for-test", title="broken", explains=(), doc="")

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def check(ev, p):
        raise ZeroDivisionError("boom")

    try:
        rule(spec, Params)(check)
        ev = checkpoint(measured(state(torch.randn(8, 2), kind="vq",
                                       optimizer={"exp_avg_sq": torch.zeros(8, 2)})))
        findings, errors = run_rules(ev)
    finally:
        _REGISTRY.pop("broken-for-test", None)
    assert errors == [{"rule": "broken-for-test", "code": "VQ999",
                       "message": "rule raised ZeroDivisionError: boom"}]
    assert [x.id for x in findings] == ["frozen-codebook"]  # the other rules still ran
    assert "broken-for-test" not in registry()


def test_zero_initialised_ema_checkpoint_diagnosed_end_to_end():
    """The user story's mechanism on real tensors: one EMA step from zero counts, then a probe.

    The story: docs/contract.md#the-user-story.
    """
    g = gen(0)
    K, D = 512, 64
    cb, z = torch.randn(K, D, generator=g), torch.randn(4096, D, generator=g)
    e, n, m = ema_step(cb, z)
    probe = torch.randn(4096, D, generator=g)
    findings, errors = run_rules(checkpoint(measured(state(e, counts=n, sums=m), probe=probe)))
    assert errors == []
    # dead codes (wasted capacity, a warning) and the collapse (an error) both follow the scale
    assert chain(findings) == [("ema-divergence", None), ("scale-mismatch", "ema-divergence"),
                               ("index-collapse", "scale-mismatch"), ("dead-codes", "scale-mismatch")]
    json.dumps([x.to_dict() for x in findings], allow_nan=False)  # evidence is JSON-native


def test_healthy_checkpoint_has_no_findings():
    g = gen(1)
    K, D = 256, 8
    z = torch.randn(8192, D, generator=g)
    cb = z[:K].clone()
    e, n, m = cb, torch.ones(K), cb.clone()
    for _ in range(5):
        e, n, m = ema_step(e, z, counts=n, sums=m)
    findings, errors = run_rules(checkpoint(measured(state(e, counts=n, sums=m), probe=z[:4096])))
    assert (findings, errors) == ([], [])


def test_evidence_can_widen_the_graph_for_one_finding():
    """index-collapse whose inputs have no spread declares it explains the dead codes beside it:
    it becomes their cause (and can no longer be caused by them); without that evidence the
    static graph (dead-codes -> index-collapse) holds."""
    collapsed = dataclasses.replace(f("index-collapse"), evidence={"z_spread": 1e-9, "explains": ["dead-codes"]})
    assert chain(rank([f("dead-codes"), collapsed], RULES)) == [("index-collapse", None),
                                                                ("dead-codes", "index-collapse")]
    assert chain(rank([f("dead-codes"), f("index-collapse")], RULES)) == [("dead-codes", None),
                                                                          ("index-collapse", "dead-codes")]
    # other mechanisms keep their place: a frozen codebook still explains both
    assert chain(rank([f("dead-codes"), collapsed, f("frozen-codebook")], RULES))[0] == ("frozen-codebook", None)
    # only on its own quantizer: dead codes of another quantizer are not explained by it
    other = f("dead-codes", "other")
    assert ("dead-codes", None) in chain(rank([other, collapsed], RULES))


def test_nonfinite_leads_independent_roots():
    """A NaN codebook makes its counts and replacements meaningless: as an independent root of the
    same severity, non-finite comes before replacement-churn and scale-mismatch."""
    found = [f("replacement-churn"), f("non-finite"), f("scale-mismatch", "other")]
    assert [x.id for x in rank(found, RULES)][0] == "non-finite"
