"""Meta-tests over the rule registry: identity, documentation, thresholds, causal links, vocabulary."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import pytest
from rules_kit import checkpoint, frame, qev, run

from vqdoctor.metrics.names import ALL
from vqdoctor.rules import registry
from vqdoctor.rules.ranking import ROOT_ORDER

# The failure-mode table of docs/contract.md#failure-modes (stable ids; codes never reused).
FAILURE_MODES = {
    "VQ001": "non-finite", "VQ002": "loss-divergence", "VQ003": "scale-mismatch",
    "VQ004": "ema-divergence", "VQ005": "dead-codes", "VQ006": "index-collapse",
    "VQ007": "no-encoder-gradient", "VQ008": "frozen-codebook", "VQ009": "codebook-redundancy",
    "VQ010": "replacement-churn", "VQ011": "rank-desync",
}
SECTIONS = ("What it detects", "Why it matters", "Signals and thresholds", "Fix", "References")
RULES = registry()


def test_eleven_rules_matching_the_contract_table():
    assert {r.spec.code: rid for rid, r in RULES.items()} == FAILURE_MODES


@pytest.mark.parametrize("rid", list(RULES))
def test_identity(rid):
    spec = RULES[rid].spec
    assert re.fullmatch(r"VQ\d{3}", spec.code)
    assert re.fullmatch(r"[a-z]+(-[a-z]+)*", spec.id)
    module = sys.modules[RULES[rid].check.__module__]
    assert Path(module.__file__).stem == f"{spec.code.lower()}_{spec.id.replace('-', '_')}"
    assert "\n" not in spec.title and 0 < len(spec.title) < 80
    assert (Path(__file__).parent / f"test_{Path(module.__file__).stem}.py").exists()


@pytest.mark.parametrize("rid", list(RULES))
def test_doc_sections_are_present_and_filled(rid):
    doc = RULES[rid].spec.doc
    assert doc.splitlines()[0].startswith(f"{RULES[rid].spec.code} {rid}")
    parts = re.split(r"^## (.+)$", doc, flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert tuple(sections) == SECTIONS
    for name, text in sections.items():
        assert len(text.strip()) > 40, f"{rid}: section {name!r} is empty"


@pytest.mark.parametrize("rid", list(RULES))
def test_thresholds_are_named_documented_and_scale_free(rid):
    r = RULES[rid]
    assert dataclasses.is_dataclass(r.params) and r.params.__dataclass_params__.frozen
    signals = r.spec.doc.split("## Signals and thresholds")[1].split("## Fix")[0]
    for name, value in r.thresholds().items():
        assert isinstance(value, (int, float)) and value >= 0, (rid, name)
        assert f"`{name}`" in signals, f"{rid}: threshold {name} not documented"


@pytest.mark.parametrize("rid", list(RULES))
def test_explains_names_known_ids_in_root_order(rid):
    explains = {k: r.spec.explains for k, r in RULES.items()}
    assert rid in ROOT_ORDER
    for symptom in explains[rid]:
        assert symptom in RULES and symptom != rid
        mutual = rid in explains[symptom]
        # a one-way edge goes from the more fundamental mechanism to the symptom
        assert mutual or ROOT_ORDER.index(rid) < ROOT_ORDER.index(symptom), (rid, symptom)


def test_only_scale_mismatch_and_loss_divergence_explain_each_other():
    explains = {k: r.spec.explains for k, r in RULES.items()}
    mutual = {tuple(sorted((a, b))) for a in explains for b in explains[a] if a in explains[b]}
    assert mutual == {("loss-divergence", "scale-mismatch")}


@pytest.mark.parametrize("rid", list(RULES))
def test_metric_names_read_by_rules_are_in_the_vocabulary(rid):
    src = inspect.getsource(sys.modules[RULES[rid].check.__module__])
    read = set(re.findall(r'(?:\.m|qcol|judge|latest)\(q, "([a-z0-9_]+)"', src))
    read |= set(re.findall(r'q\.m\("([a-z0-9_]+)"', src))
    read |= set(re.findall(r'(?:column|frame)\(ev\.run_series, \[?"([a-z0-9_]+)"', src))
    assert read, rid
    assert read <= set(ALL), sorted(read - set(ALL))


@pytest.mark.parametrize("kind", ["vq-ema", "vq", "gumbel", "simvq", "fsq", "lfq"])
def test_missing_metrics_mean_silence_not_findings(kind):
    empty = [checkpoint(qev({}, kind=kind)), run(qev(series=frame(unrelated=[1.0] * 5), kind=kind),
                                                  run_series=frame(unrelated=[1.0] * 5)),
             checkpoint()]
    for ev in empty:
        for rid, r in RULES.items():
            assert r.run(ev) == [], (rid, kind)
