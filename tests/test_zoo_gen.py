"""The generated zoo (`benchmarks/zoo/gen/`): specs, split, twins, label checks, scoring.

Fast tests need no training. The end-to-end test trains one variant and its twin under
`vqdoctor watch` and inspects it (about a minute on 2 shared cores): marked `slow`, run with
`pytest -m slow tests/test_zoo_gen.py`.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "benchmarks" / "zoo" / "gen"
sys.path.insert(0, str(GEN))

import confirm  # noqa: E402
import score  # noqa: E402
import spec as S  # noqa: E402

SPECS = S.draw_many(300)


def test_a_seed_always_draws_the_same_spec_and_seeds_differ() -> None:
    assert S.draw(17) == S.draw(17)
    assert len({json.dumps(s, sort_keys=True) for s in SPECS}) == len(SPECS)


def test_the_split_is_by_seed_about_a_third_held_out_and_stable() -> None:
    held = [s for s in SPECS if s["split"] == "holdout"]
    assert 0.25 < len(held) / len(SPECS) < 0.42
    assert all(S.split_of(s["seed"]) == s["split"] for s in SPECS)
    assert S.split_of(5) == S.split_of(5)


def test_every_fault_class_library_version_and_pattern_is_drawn() -> None:
    classes = collections.Counter(s["expect"] for s in SPECS)
    assert set(classes) == set(S.FAULTS) | {"healthy"}
    assert min(classes.values()) >= 10, classes
    assert {s["libver"] for s in SPECS} == {None, "1.34.1", "1.32.0"}
    assert {s["library"] for s in SPECS} >= {"vector-quantize-pytorch", "encodec", "transformers", "diffusers",
                                             "taming-style", "zalando-style", "rosinality-style", "custom"}
    assert any(s["pattern"]["separate"] and s["container"] == "quantizer-only" for s in SPECS)
    assert any(s["pattern"]["manual_optim"] for s in SPECS) and any(s["pattern"]["accum"] > 1 for s in SPECS)
    assert any(s["names"]["quantizer"] in ("block2", "m") for s in SPECS)
    assert {s["variant"] for s in SPECS if s["fault"] == "healthy"} == set(S.HEALTHY_VARIANTS)
    assert {s["probe"] for s in SPECS} == set(S.PROBES)


def test_each_mechanism_is_drawn_only_for_kinds_it_applies_to() -> None:
    for s in SPECS:
        if s["fault"] != "healthy":
            assert s["kind"] in S.MECHANISMS[s["fault"]][s["mechanism"]], s["id"]
        assert s["kind"] != "lucid-fsq" or s["inspect_args"][-1] == ",".join(map(str, s["levels"]))


def test_the_twin_changes_only_the_fault_switch() -> None:
    s = next(x for x in SPECS if x["fault"] == "frozen-codebook")
    t = S.twin(s)
    assert t["twin"] and not s["twin"] and t["id"] == s["id"] + "-twin"
    assert {k: v for k, v in t.items() if k not in ("twin", "id")} == {k: v for k, v in s.items() if k not in ("twin", "id")}
    h = next(x for x in SPECS if x["fault"] == "healthy")
    assert S.twin(h) == h


def test_no_zoo_script_imports_vqdoctor() -> None:
    for path in [*GEN.glob("*.py"), *(ROOT / "benchmarks" / "zoo" / "thirdparty").glob("*.py")]:
        text = path.read_text()
        if path.name in ("runner.py", "zoo_sets.py"):  # the runner calls the CLI, never imports it
            assert "import vqdoctor" not in text
            continue
        assert "import vqdoctor" not in text and "from vqdoctor" not in text, path.name


def _ref(**kw) -> dict:
    base = {"K": 64, "usage": [{"perplexity": 30.0, "unused_fraction": 0.2, "window_tokens": 20000}],
            "nonfinite": {"loss_steps": 0, "z": 0, "codebook": 0, "first_step": None},
            "task_loss": [1.0] * 5 + [0.3] * 10, "loss": [1.0] * 15, "task_grad": [(0, 0.1), (10, 0.2)],
            "cadence": [{"step": 0, "z_norm_median": 1.0, "code_norm_median": 1.0, "code_norm_max": 2.0,
                         "scale_ratio": 1.0, "blowup": 2.0, "scale_ratio_used": 1.0}],
            "codebook_moved_rel": 0.3, "duplicate_fraction": 0.0, "replaced_late_mean": 0.0,
            "eval_move_max": None, "train_move_median": 0.01, "init_code_norm_max": 2.0}
    base.update(kw)
    return base


def test_labels_need_the_signature_against_a_healthy_twin() -> None:
    sp = {"fault": "frozen-codebook", "mechanism": "not-in-optimizer", "learn": "grad", "onset": 0}
    assert confirm.confirm(sp, _ref(codebook_moved_rel=0.0), _ref())[0]
    assert not confirm.confirm(sp, _ref(codebook_moved_rel=0.2), _ref())[0]  # the fault did not show
    sick_twin = _ref(task_loss=[1.0] * 15)  # the twin does not learn: ablation does not restore health
    ok, why = confirm.confirm(sp, _ref(codebook_moved_rel=0.0), sick_twin)
    assert not ok and "twin not healthy" in why
    grad = {"fault": "no-encoder-gradient", "mechanism": "detach", "learn": "ema", "onset": 0}
    assert confirm.confirm(grad, _ref(task_grad=[(0, 0.0), (10, 0.0)]), _ref())[0]
    assert not confirm.confirm(grad, _ref(task_grad=[(0, 0.0), (10, 1e-9)]), _ref())[0]


def test_a_healthy_variant_may_be_imperfect_but_not_collapsed() -> None:
    sp = {"fault": "healthy", "learn": "ema"}
    imperfect = _ref(K=512, usage=[{"perplexity": 210.0, "unused_fraction": 0.55, "window_tokens": 20000}])
    assert confirm.confirm(sp, imperfect, None)[0] and confirm.imperfect(imperfect)
    collapsed = _ref(K=512, usage=[{"perplexity": 3.0, "unused_fraction": 0.99, "window_tokens": 20000}])
    assert not confirm.confirm(sp, collapsed, None)[0]


def test_wilson_interval_and_judging() -> None:
    lo, hi = score.wilson(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.29
    lo, hi = score.wilson(95, 100)
    assert 0.88 < lo < 0.89 and 0.97 < hi < 0.99
    rep = {"findings": [{"id": "dead-codes", "severity": "info", "step": 0},
                        {"id": "frozen-codebook", "severity": "warning", "step": 3}],
           "quantizers": [{"name": "q.layers.0", "codebook_size": 64}, {"name": "q.layers.1", "codebook_size": 64}]}
    j = score.judge(rep, "frozen-codebook", 0, [{"K": 64, "count": 2}])
    assert j["ok1"] and j["worst"] == "warning" and j["found"]
    assert not score.judge(rep, "frozen-codebook", 0, [{"K": 64, "count": 3}])["found"]
    assert score.judge(None, "healthy", 0, [{"K": 64, "count": 1}])["worst"] == "n/a"


def test_held_out_tables_show_no_variant() -> None:
    rows = []
    for i, (expect, top) in enumerate([("healthy", "healthy"), ("dead-codes", "dead-codes"),
                                       ("frozen-codebook", "dead-codes")]):
        j = score.judge({"findings": [] if top == "healthy" else [{"id": top, "severity": "error"}],
                         "quantizers": [{"codebook_size": 8}]}, expect, 0, [{"K": 8, "count": 1}])
        rows.append({"id": f"g9{i:03d}", "expect": expect, "confirmed": True, "libver": None, "kind": "custom-vq",
                     "modes": {m: j for m in score.MODES}})
    text = score.holdout_tables(rows)
    assert "g9000" not in text and "g9002" not in text
    assert "1/2 (50%" in text  # top-1 over the two faulty rows
    assert "g9002" in score.tune_tables([dict(r, library="custom", pattern_tag="single", container="raw",
                                              probe="tensor", mechanism=None, variant="plain", K=8, stages=1)
                                         for r in rows])


@pytest.mark.slow
def test_one_variant_end_to_end(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("trains a real variant and its twin (about a minute): run with -m slow")
    import runner

    sp = next(s for s in SPECS if s["kind"] == "custom-vq" and s["fault"] == "frozen-codebook")
    row = runner.run_variant(sp, tmp_path)
    ref = json.loads((tmp_path / sp["split"] / sp["id"] / "files" / "reference.json").read_text())
    assert ref["codebook_moved_rel"] == 0.0 and ref["id"] == sp["id"]
    assert row["confirmed"], row["reason"]
    assert set(row["modes"]) == set(score.MODES)
    assert all(j["top"] != "" for j in row["modes"].values())
