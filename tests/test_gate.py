"""`vqdoctor gate` on real checkpoints and real recorded runs: verdicts, exit codes, thresholds.

Checkpoints come from the CI example itself (`examples/ci/smoke_train.py`, trained in-process:
healthy, and with `--bug`, which collapses); runs are recorded with `vqdoctor.watch` around the
same model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import vqdoctor
from vqdoctor.cli import app
from vqdoctor.errors import ConfigError, InputError
from vqdoctor.gate import (
    GateThresholds,
    PerplexityFloor,
    Status,
    gate,
    parse_threshold,
    reachable_codes,
    resolve_thresholds,
)

SMOKE = Path(__file__).parents[1] / "examples" / "ci" / "smoke_train.py"
# the usage floors are opt-in (the default gate fails on collapse, not on partial usage)
USAGE = {"min_usage": 0.25, "max_dead_fraction": 0.5}


def load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smoke_train", SMOKE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smoke() -> ModuleType:
    return load_smoke()


_TRAINED: dict[str, Path] = {}  # shared with test_gate_formats, which imports the fixture


@pytest.fixture(scope="session")
def trained(smoke: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"healthy": dir, "collapsed": dir}, each with checkpoint.pt and probe.pt."""
    if not _TRAINED:
        root = tmp_path_factory.mktemp("smoke")
        smoke.main(["--out", str(root / "healthy"), "--steps", "100"])
        smoke.main(["--out", str(root / "collapsed"), "--steps", "100", "--bug"])
        _TRAINED.update(healthy=root / "healthy", collapsed=root / "collapsed")
    return dict(_TRAINED)


def record_run(smoke: ModuleType, run_dir: Path, *, bug: bool, steps: int = 100,
               crash_at: int | None = None) -> Path:
    """Train the smoke model under `vqdoctor.watch`, recording `run_dir`."""
    torch.manual_seed(0)
    data = smoke.make_data(4096, 16)
    if not bug:
        data = (data - data.mean(0)) / data.std(0)
    model = smoke.AutoEncoder(16, 8, 64)
    with torch.no_grad():
        model.quantizer.init_codes(model.encoder(data[:2048]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    try:
        with vqdoctor.watch(model, run_dir, flush_every=20) as doctor:
            for step in range(steps):
                if step == crash_at:
                    raise RuntimeError("training crashed")
                x = data[torch.randint(0, len(data), (256,))]
                recon, _, commit = model(x)
                loss = F.mse_loss(recon, x) + 0.25 * commit
                opt.zero_grad()
                loss.backward()
                opt.step()
                doctor.step(loss)
    except RuntimeError:
        pass
    return run_dir


@pytest.fixture(scope="session")
def runs(smoke: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"healthy": record_run(smoke, root / "healthy", bug=False),
            "collapsed": record_run(smoke, root / "collapsed", bug=True),
            "crashed": record_run(smoke, root / "crashed", bug=False, crash_at=60)}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: Any, **kw: Any):
    result = runner.invoke(app, ["gate", *map(str, args)], **kw)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def checks(result) -> dict[tuple[str | None, str], Any]:
    return {(c.quantizer, c.name): c for c in result.checks}


# --- thresholds --------------------------------------------------------------------------------


def test_parse_threshold_values() -> None:
    assert parse_threshold("min_perplexity", "5%") == PerplexityFloor(0.05, relative=True)
    assert parse_threshold("min_perplexity", 20) == PerplexityFloor(20.0)
    assert parse_threshold("min_usage", "25%") == pytest.approx(0.25)
    assert parse_threshold("max_dead_fraction", 0.4) == pytest.approx(0.4)
    assert parse_threshold("max_dead_fraction", "off") is None
    assert parse_threshold("window", "200") == 200
    assert parse_threshold("fail_on", "WARNING") == "warning"


@pytest.mark.parametrize("key,value,says", [
    ("min_perplexity", "0.05", "never fails"),      # a share must be written as a percentage
    ("min_perplexity", "abc", "expected"),
    ("min_perplexity", "150%", "(0%, 100%]"),
    ("min_usage", "1.5", "[0, 1]"),
    ("max_dead_fraction", "nan", "expected"),
    ("window", "0", ">= 1"),
    ("fail_on", "fatal", "error, warning, never"),
    ("min_speed", 1, "unknown gate setting"),
])
def test_parse_threshold_rejects(key: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        parse_threshold(key, value)
    assert says in str(e.value)


def test_reachable_codes_is_scale_free() -> None:
    assert reachable_codes(64, None) == 64                            # EMA counts: all of K
    assert reachable_codes(1024, 100) == pytest.approx(95.3, abs=0.1)  # few tokens: ~n
    assert reachable_codes(64, 64 * 20) == pytest.approx(64, rel=1e-6)


def test_precedence_cli_over_file_over_defaults() -> None:
    default = resolve_thresholds()
    assert default == GateThresholds()
    file = {"min_usage": 0.4, "max_dead_fraction": "30%", "window": 50,
            "quantizers": {"enc.*": {"min_usage": 0.1, "min_perplexity": 8}}}
    th = resolve_thresholds({"min_usage": "0.6", "window": None}, file)
    assert th.min_usage == pytest.approx(0.6)                 # CLI > file
    assert th.max_dead_fraction == pytest.approx(0.3)          # file > default
    assert th.min_perplexity == GateThresholds().min_perplexity  # default
    assert th.window == 50
    enc = th.for_quantizer("enc.vq")
    assert enc.min_usage == pytest.approx(0.6)                 # CLI wins over the pattern table too
    assert enc.min_perplexity == PerplexityFloor(8.0)          # the pattern table refines the file
    assert th.for_quantizer("dec.vq").min_perplexity == GateThresholds().min_perplexity


def test_per_quantizer_tables_apply_in_order() -> None:
    th = resolve_thresholds(None, {"quantizers": {"*": {"min_usage": 0.5},
                                                  "rvq.layers.*": {"min_usage": 0.05}}})
    assert th.for_quantizer("rvq.layers.3").min_usage == pytest.approx(0.05)
    assert th.for_quantizer("vq").min_usage == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="unknown setting 'window'"):
        resolve_thresholds(None, {"quantizers": {"x": {"window": 3}}})


# --- checkpoints ------------------------------------------------------------------------------


def test_healthy_checkpoint_passes(trained: dict[str, Path]) -> None:
    result = gate(trained["healthy"] / "checkpoint.pt")
    assert result.outcome == "pass" and result.passed
    got = checks(result)
    assert {name for _, name in got} == {"min_perplexity", "min_usage", "max_dead_fraction",
                                         "findings"}
    c = got[("quantizer", "min_perplexity")]
    assert c.status is Status.PASS and c.metric == "perplexity" and c.source == "EMA counts"
    assert c.threshold == pytest.approx(2.0)  # 1% of 64 codes is less than the 2 of a collapse
    assert got[("quantizer", "min_usage")].status is Status.SKIP  # opt-in
    assert gate(trained["healthy"] / "checkpoint.pt", GateThresholds(**USAGE)).passed


def test_the_default_gate_passes_partial_usage_and_fails_a_collapse() -> None:
    floor = GateThresholds().min_perplexity
    assert floor is not None and str(floor) == "1% (at least 2)"
    assert floor.floor(64) == 2.0 and floor.floor(65536) == pytest.approx(655.36)
    assert floor.floor(3) == 1.5  # never more than half of what a tiny measurement can reach


def test_collapsed_checkpoint_fails_with_the_probe_as_source(trained: dict[str, Path]) -> None:
    d = trained["collapsed"]
    result = gate(d / "checkpoint.pt", GateThresholds(**USAGE), probe=d / "probe.pt")
    assert result.outcome == "fail"
    got = checks(result)
    for name, metric in (("min_perplexity", "probe_perplexity"),
                         ("min_usage", "probe_usage_fraction"),
                         ("max_dead_fraction", "probe_dead_fraction")):
        c = got[("quantizer", name)]
        assert c.status is Status.FAIL and c.metric == metric
        assert c.source.startswith("probe")
        assert c.finding is not None and c.finding.severity in ("error", "warning")
    assert got[("quantizer", "min_perplexity")].value < 2
    assert got[("quantizer", "findings")].status is Status.FAIL
    assert result.failures[0].finding.id == result.report.diagnosis.id


def test_a_small_probe_scales_the_thresholds(trained: dict[str, Path], tmp_path: Path) -> None:
    # 16 vectors can hit at most ~14 of 64 codes: unscaled, usage >= 25% could never pass
    z = torch.load(trained["healthy"] / "probe.pt", weights_only=True)[:16]
    torch.save(z, tmp_path / "small.pt")
    result = gate(trained["healthy"] / "checkpoint.pt", GateThresholds(**USAGE), probe=tmp_path / "small.pt")
    assert result.outcome == "pass", [c.message for c in result.failures]
    usage = checks(result)[("quantizer", "min_usage")]
    assert usage.metric == "probe_usage_fraction" and usage.value < 0.25
    assert usage.threshold == pytest.approx(0.25 * reachable_codes(64, 16) / 64)
    assert "reachable with 16 tokens" in usage.message


def test_fail_on_never_and_turned_off_checks_pass_a_collapse(trained: dict[str, Path]) -> None:
    th = GateThresholds(min_perplexity=None, min_usage=None, max_dead_fraction=None,
                        fail_on="never")
    result = gate(trained["collapsed"] / "checkpoint.pt", th)
    assert result.outcome == "pass"
    assert all(c.status is Status.SKIP for c in result.checks)


def test_pattern_override_on_a_two_quantizer_checkpoint(trained: dict[str, Path],
                                                        tmp_path: Path) -> None:
    good = torch.load(trained["healthy"] / "checkpoint.pt", weights_only=True)
    bad = torch.load(trained["collapsed"] / "checkpoint.pt", weights_only=True)
    sd = {}
    for name, src in (("vq.coarse", good), ("vq.fine", bad)):
        for key in ("embed", "cluster_size", "embed_avg"):
            sd[f"{name}.{key}"] = src[f"quantizer.{key}"]
    torch.save(sd, tmp_path / "two.pt")
    lenient = {"min_perplexity": 1, "min_usage": 0, "max_dead_fraction": 1}
    th = resolve_thresholds({"fail_on": "never"}, {"quantizers": {"*.fine": lenient}})
    result = gate(tmp_path / "two.pt", th)
    assert result.outcome == "pass", [c.message for c in result.failures]
    strict = gate(tmp_path / "two.pt", GateThresholds(fail_on="never", **USAGE))
    assert {c.quantizer for c in strict.failures} == {"vq.fine"}
    only = gate(tmp_path / "two.pt", GateThresholds(), quantizers=["*.coarse"])
    assert only.outcome == "pass" and {c.quantizer for c in only.checks} == {"vq.coarse"}
    with pytest.raises(InputError, match="matches no quantizer"):
        gate(tmp_path / "two.pt", quantizers=["decoder.*"])


# --- run directories ---------------------------------------------------------------------------


def test_healthy_run_passes_and_collapsed_run_fails(runs: dict[str, Path]) -> None:
    ok = gate(runs["healthy"])
    assert ok.outcome == "pass", [c.message for c in ok.failures]
    got = checks(ok)
    assert got[("quantizer", "min_perplexity")].metric == "perplexity_window"
    assert got[(None, "training")].status is Status.PASS
    bad = gate(runs["collapsed"])
    assert bad.outcome == "fail"
    assert checks(bad)[("quantizer", "min_perplexity")].status is Status.FAIL
    # the recorded window (100 steps: the whole run) still holds the steps before the collapse,
    # when most codes were hit; the last 40 steps do not
    recent = checks(gate(runs["collapsed"], GateThresholds(window=40, **USAGE)))
    for name in ("min_perplexity", "min_usage", "max_dead_fraction"):
        assert recent[("quantizer", name)].status is Status.FAIL, name
    assert recent[("quantizer", "min_usage")].metric == "usage_window"


def test_run_window_aggregates_the_last_steps(runs: dict[str, Path]) -> None:
    result = gate(runs["healthy"], GateThresholds(window=40, **USAGE))
    c = checks(result)[("quantizer", "min_usage")]
    assert c.status is Status.PASS and "last 40 steps" in c.source
    short = gate(runs["healthy"], GateThresholds(window=5, **USAGE))   # shorter than one interval
    assert "last 20 steps" in checks(short)[("quantizer", "min_usage")].source
    assert any("covers the last 20 steps" in n for n in short.notes)


def test_crashed_run_fails_the_training_check(runs: dict[str, Path]) -> None:
    result = gate(runs["crashed"])
    training = checks(result)[(None, "training")]
    assert training.status is Status.FAIL and "failed" in training.message
    assert result.failures[0].name == "training"


def test_a_training_exit_code_is_a_gate_failure(runs: dict[str, Path]) -> None:
    # what `gate -- CMD` does once the launcher returns (exit_code, run_dir)
    result = gate(runs["healthy"], command=["python", "train.py"], exit_code=3)
    assert result.outcome == "fail" and result.exit_code == 3
    first = result.failures[0]
    assert first.name == "training" and first.value == 3
    assert first.message == "the training failed: python train.py exited with code 3"
    assert gate(runs["healthy"], command=["python", "train.py"], exit_code=0).outcome == "pass"


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_exit_codes(runner: CliRunner, trained: dict[str, Path],
                        runs: dict[str, Path]) -> None:
    assert invoke(runner, trained["healthy"] / "checkpoint.pt").exit_code == 0
    bad = invoke(runner, trained["collapsed"] / "checkpoint.pt")
    assert bad.exit_code == 1
    assert "FAIL min_perplexity" in bad.stdout and "gate failed" in bad.stderr
    assert invoke(runner, runs["healthy"], "--window", 40).exit_code == 0
    crashed = invoke(runner, runs["crashed"])
    assert crashed.exit_code == 1 and "the training failed" in crashed.stdout


def test_cli_thresholds_change_the_verdict(runner: CliRunner, trained: dict[str, Path]) -> None:
    ckpt = trained["healthy"] / "checkpoint.pt"
    assert invoke(runner, ckpt, "--min-perplexity", "95%").exit_code == 1
    assert invoke(runner, ckpt, "--min-perplexity", "80").exit_code == 1
    collapsed = trained["collapsed"] / "checkpoint.pt"
    lenient = invoke(runner, collapsed, "--min-perplexity", "1", "--min-usage", "0",
                     "--max-dead-fraction", "100%", "--fail-on", "never")
    assert lenient.exit_code == 0, lenient.stdout


def _write_pyproject(path: Path, body: str) -> None:
    (path / "pyproject.toml").write_text("[tool.vqdoctor.gate]\n" + body, encoding="utf-8")


def test_cli_pyproject_precedence(runner: CliRunner, trained: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = trained["healthy"] / "checkpoint.pt"
    monkeypatch.chdir(tmp_path)
    assert invoke(runner, ckpt).exit_code == 0                      # defaults
    _write_pyproject(tmp_path, 'min_perplexity = "99%"\n')
    assert invoke(runner, ckpt).exit_code == 1                      # file > defaults
    assert invoke(runner, ckpt, "--min-perplexity", "5%").exit_code == 0   # CLI > file
    _write_pyproject(tmp_path, 'min_perplexity = "99%"\n'
                               '[tool.vqdoctor.gate.quantizers."quant*"]\nmin_perplexity = 2\n')
    result = invoke(runner, ckpt, "--format", "json")
    assert result.exit_code == 0                                    # pattern table refines file
    doc = json.loads(result.stdout)
    assert doc["thresholds"]["min_perplexity"] == "99%"
    assert doc["thresholds"]["quantizers"] == {"quant*": {"min_perplexity": "2"}}
    _write_pyproject(tmp_path, 'min_usage = "lots"\n')
    bad = invoke(runner, ckpt)
    assert bad.exit_code == 2 and "pyproject.toml" in bad.stderr and "min_usage" in bad.stderr


@pytest.mark.parametrize("args,says", [
    (["{missing}"], "no such file"),
    (["{garbage}"], "not a checkpoint"),
    (["{ckpt}", "--min-perplexity", "abc"], "--min-perplexity"),
    (["{ckpt}", "--min-perplexity", "0.05"], "never fails"),
    (["{ckpt}", "--max-dead-fraction", "1.5"], "[0, 1]"),
    (["{ckpt}", "--window", "10"], "--window applies to run directories"),
    (["{ckpt}", "--quantizer", "nothing*"], "matches no quantizer"),
    (["{run}", "--probe", "{ckpt}"], "--probe applies to checkpoints"),
])
def test_cli_bad_input_exits_2(runner: CliRunner, trained: dict[str, Path],
                               runs: dict[str, Path], tmp_path: Path, args: list[str],
                               says: str) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all\n")
    paths = {"missing": tmp_path / "missing.pt", "garbage": tmp_path / "garbage.pt",
             "ckpt": trained["collapsed"] / "checkpoint.pt", "run": runs["healthy"]}
    result = invoke(runner, *[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert says in result.stderr
    assert "Traceback" not in result.output


def test_cli_junit_file_on_bad_input(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "gate.xml"
    result = invoke(runner, tmp_path / "missing.pt", "--format", "junit", "--output", out)
    assert result.exit_code == 2
    import xml.etree.ElementTree as ET

    root = ET.parse(out).getroot()
    assert root.get("errors") == "1"
    assert "no such file" in root.find("testsuite/testcase/error").get("message")


def test_cli_github_appends_the_step_summary(runner: CliRunner, trained: dict[str, Path],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke(runner, trained["collapsed"] / "checkpoint.pt", "--format", "github",
                    "--min-usage", "0.25")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("::error title=vqdoctor gate%3A quantizer min_perplexity::")
    assert lines[-1].startswith("gate failed:")
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("# earlier step\n")                       # appended, not replaced
    assert "## ❌ vqdoctor gate failed" in text and "| ❌ fail | `quantizer` | min_usage |" in text


def test_nothing_measurable_is_exit_2_and_a_probe_fixes_it(runner: CliRunner,
                                                           trained: dict[str, Path],
                                                           tmp_path: Path) -> None:
    sd = torch.load(trained["healthy"] / "checkpoint.pt", weights_only=True)
    torch.save({"quantizer.embed": sd["quantizer.embed"]}, tmp_path / "no_counts.pt")
    result = gate(tmp_path / "no_counts.pt")
    assert result.outcome == "incomplete"
    assert all(c.status is Status.SKIP for c in result.checks if c.name != "findings")
    assert "--probe" in result.checks[0].message
    cli = invoke(runner, tmp_path / "no_counts.pt")
    assert cli.exit_code == 2 and "gate could not analyse" in cli.stderr
    probed = gate(tmp_path / "no_counts.pt", GateThresholds(**USAGE), probe=trained["healthy"] / "probe.pt")
    assert probed.outcome == "pass"
    assert {c.metric for c in probed.checks if c.status is Status.PASS} >= {
        "probe_perplexity", "probe_usage_fraction", "probe_dead_fraction"}


# --- the CI example ----------------------------------------------------------------------------


def test_smoke_bug_is_one_line() -> None:
    code = [line for line in SMOKE.read_text(encoding="utf-8").splitlines()
            if "args.bug" in line]
    assert len(code) == 1 and "THE ONE LINE" in code[0]


def test_workflow_trains_and_gates() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((SMOKE.parent / "vqdoctor-gate.yml").read_text(encoding="utf-8"))
    runs = [step.get("run", "") for job in doc["jobs"].values() for step in job["steps"]]
    text = "\n".join(runs)
    assert "python examples/ci/smoke_train.py --out smoke" in text
    assert "--format github" in text and "--format junit" in text
    assert "smoke_train.py --out smoke-bug --bug" in text and 'test "$code" -eq 1' in text
