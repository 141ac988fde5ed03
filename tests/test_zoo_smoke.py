"""The zoo harness (`benchmarks/zoo/run.py`): scenario contract and an end-to-end smoke run.

The contract and judging tests are fast and always run. The end-to-end test trains two real
scenarios (one healthy, one failure) under `vqdoctor watch` and inspects them; it takes a few
minutes on 2 shared cores, so it is marked `slow` and runs only when selected: `pytest -m slow
tests/test_zoo_smoke.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vqdoctor.rules import registry

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "zoo"


def _load_run():
    spec = importlib.util.spec_from_file_location("zoo_run", ZOO / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["zoo_run"] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load_run()
KEYS = {"expect", "onset", "library", "family", "K", "D", "tokens_per_step", "steps", "launch", "fault"}
FAMILIES = {"vq-ema", "vq", "rvq", "fsq", "lfq", "vqvae2", "gumbel"}


@pytest.mark.parametrize("path", run.discover(), ids=lambda p: p.stem)
def test_every_scenario_follows_the_contract(path: Path) -> None:
    sc = run.read_scenario(path)
    assert KEYS <= set(sc), KEYS - set(sc)
    ids = {r.spec.id for r in registry().values()} | {"healthy"}
    assert sc["expect"] in ids
    assert sc["family"] in FAMILIES
    assert sc["launch"] in ("python", "torchrun2")
    assert isinstance(sc["onset"], int) and 0 <= sc["onset"] < sc["steps"]
    assert "import vqdoctor" not in path.read_text() and "from vqdoctor" not in path.read_text()


def test_judge_reads_the_first_error_or_warning_as_the_diagnosis() -> None:
    report = {"findings": [
        {"id": "index-collapse", "severity": "info", "step": 3, "message": ""},
        {"id": "frozen-codebook", "severity": "error", "step": 30, "message": "m"},
        {"id": "dead-codes", "severity": "warning", "step": 12, "message": ""},
    ]}
    j = run.judge(report, "dead-codes", onset=10)
    assert j["top"] == "frozen-codebook" and not j["ok1"] and j["ok3"]
    assert j["alert"] == 2 and j["held"] == 2  # earliest error/warning at or after the onset
    assert run.judge({"findings": []}, "healthy", 0)["ok1"]
    assert run.judge(None, "healthy", 0)["top"] == "n/a"


def test_summary_counts_false_alarms_and_accuracy() -> None:
    def res(name, expect, tops):
        modes = {m: run.judge({"findings": [] if t == "healthy" else [
            {"id": t, "severity": "error", "step": 5, "message": ""}]}, expect, 0) for m, t in zip(run.MODES, tops, strict=True)}
        return {"name": name, "expect": expect, "library": "x", "K": 8, "D": 2, "rc": 0, "seconds": 1.0,
                "modes": modes}
    table = run.summarise([res("h", "healthy", ["healthy", "dead-codes", "healthy"]),
                           res("f", "dead-codes", ["dead-codes", "healthy", "dead-codes"])], True)
    assert "| watch | 1/1 (100%) (95%) | 1/1 (100%) | 0/1 | 0/1 | 5 / 5 | 5 / 5 |" in table
    assert "| inspect | 0/1 (0%) (70%) | 0/1 (0%) | 1/1 | 0/1 |" in table


@pytest.mark.slow
def test_zoo_end_to_end_on_two_scenarios(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("trains real scenarios (minutes): run with -m slow")
    use_watch = run.watch_available()
    paths = [p for p in run.discover() if p.stem in ("healthy_vqema_lucidrains", "vq008_frozen_codebook_lucidrains")]
    assert len(paths) == 2
    results = [run.run_scenario(p, tmp_path, use_watch) for p in paths]
    for r in results:
        assert r["rc"] in (0, 1), (tmp_path / r["name"] / "train.log").read_text()[-2000:]
        assert (tmp_path / r["name"] / "final.pt").exists()
        assert r["modes"]["inspect"]["top"] != "n/a"
        assert r["modes"]["inspect+probe"]["top"] != "n/a"
        if use_watch:
            assert r["modes"]["watch"]["top"] != "n/a"
    frozen = next(r for r in results if r["expect"] == "frozen-codebook")
    # bit-identical early/final checkpoints: the drift signal needs no threshold
    assert frozen["modes"]["inspect"]["top"] == "frozen-codebook"
    assert "vq008_frozen_codebook_lucidrains" in run.summarise(results, use_watch)
