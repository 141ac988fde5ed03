"""`vqdoctor watch -- CMD`: real tiny trainings, unmodified scripts, watched through the launcher.

Every run is a real subprocess (`python -m vqdoctor watch ... -- python script.py`); the runs of
this module start together in a small pool when the first test needs one (each spends most of
its time importing torch), and each test then checks its own run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vqdoctor
from tests.watch.launcher_scripts import DDP, SCENARIO
from vqdoctor.live.launcher import BOOT_DIR, ENV_CONFIG
from vqdoctor.live.store import load_records, read_meta

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

REPO = Path(__file__).resolve().parents[2]
STEPS = 150
FLAGS = ["--flush-every", "25", "--stats-every", "5", "--no-panel", "--format", "json"]

# scenario -> (expected top finding or None for healthy, extra vqdoctor options)
SCENARIOS: dict[str, tuple[str | None, list[str]]] = {
    "healthy": (None, ["--fail-on", "error"]),
    "dead-codes": ("dead-codes", []),
    "scale-mismatch": ("scale-mismatch", ["--fail-on", "error"]),
    "eval-mutation": ("ema-divergence", []),
    "non-finite": ("non-finite", []),
    "no-encoder-gradient": ("no-encoder-gradient", []),
    "frozen-codebook": ("frozen-codebook", []),
    "loss-divergence": ("loss-divergence", []),
}


def _env() -> dict[str, str]:
    # PYTHONPATH is kept: the version matrix puts another release of a library first on it
    env = {k: v for k, v in os.environ.items() if k != ENV_CONFIG}
    env.update(NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Start every launcher run of this module; name -> (Future[CompletedProcess], run dir, folder)."""
    root = tmp_path_factory.mktemp("launcher")
    (root / "scenario.py").write_text(SCENARIO)
    (root / "train_ddp.py").write_text(DDP)
    vq = [sys.executable, "-m", "vqdoctor", "watch"]
    jobs: dict[str, tuple[list[str], dict[str, str] | None]] = {}
    for name, (_, opts) in SCENARIOS.items():
        jobs[name] = ([*vq, "--run-dir", f"run-{name}", *FLAGS, *opts, "--output", f"report-{name}.json",
                       "--", sys.executable, "scenario.py", name, str(REPO), f"losses-{name}.json"], None)
    for mode in ("sync", "desync"):
        jobs[f"ddp-{mode}"] = ([*vq, "--run-dir", f"run-ddp-{mode}", "--flush-every", "20", "--stats-every", "5",
                                "--no-panel", "--", sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node", "2", "train_ddp.py", mode], None)
    # the single-process reference runs with the launcher's environment only (no vqdoctor parent)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOT_DIR), env.get("PYTHONPATH", "")) if p)
    env[ENV_CONFIG] = json.dumps({"run_dir": str(root / "run-ddp-single"), "flush_every": 20, "stats_every": 5})
    jobs["ddp-single"] = ([sys.executable, "train_ddp.py", "single"], env)
    # the slowest first: the DDP runs start three interpreters each
    order = ["ddp-sync", "ddp-desync", *SCENARIOS, "ddp-single"]
    pool = ThreadPoolExecutor(max_workers=4)
    futures: dict[str, Future] = {n: pool.submit(_run, jobs[n][0], root, jobs[n][1]) for n in order}
    yield {n: (futures[n], root / f"run-{n}", root) for n in order}
    pool.shutdown(wait=True, cancel_futures=True)


def _done(runs: dict[str, Any], name: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    fut, run_dir, root = runs[name]
    return fut.result(), run_dir, root


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_top_finding_under_the_launcher(runs, name):
    proc, run_dir, root = _done(runs, name)
    expected = SCENARIOS[name][0]
    report = json.loads((root / f"report-{name}.json").read_text())
    findings = [(f["id"], f["severity"], f["step"]) for f in report["findings"]]
    assert report["source"]["kind"] == "run", _explain(proc)
    if expected is None:
        assert report["verdict"] == "healthy", findings
    else:
        assert findings and findings[0][0] == expected, (findings, _explain(proc))
        assert findings[0][1] in ("error", "warning")
        assert findings[0][2] is not None
    # the report on disk is the one `vqdoctor report` gives later, from the run directory alone
    assert [f.id for f in vqdoctor.report(run_dir).findings] == [f[0] for f in findings]


@pytest.mark.parametrize("name", ["healthy", "scale-mismatch", "frozen-codebook", "no-encoder-gradient"])
def test_every_step_recorded_with_its_loss(runs, name):
    proc, run_dir, root = _done(runs, name)
    df = vqdoctor.load_run(run_dir)
    meta = read_meta(run_dir)
    names = [q["name"] for q in meta["quantizers"]]
    assert names, _explain(proc)
    for q in names:
        assert df[df["quantizer"] == q]["step"].tolist() == list(range(STEPS)), q
    # the loss comes from wrapping torch.autograd.backward: the script's own loss, every step
    run = df[df["quantizer"] == ""].set_index("step")["loss"]
    losses = json.loads((root / f"losses-{name}.json").read_text())
    np.testing.assert_array_equal(run.reindex(range(STEPS)).to_numpy(), np.asarray(losses, dtype=np.float32))
    assert meta["command"][-4:] == ["scenario.py", name, str(REPO), f"losses-{name}.json"]
    assert meta["status"] == "finished" and meta["exit_code"] == 0
    if name == "frozen-codebook":  # encodec's RVQ: one record stream per stage
        assert names == ["quantizer.layers.0", "quantizer.layers.1"]


def test_attach_message_and_panel_lines(runs):
    proc, run_dir, _ = _done(runs, "scale-mismatch")
    err = proc.stderr
    assert f"vqdoctor: watching QuantAE: 1 quantizer (quantizer) -> {run_dir.resolve()}" in err
    # plain status lines (not a terminal) and the alert, with the step it first held
    assert "vqdoctor: step 149  quantizer: ppl " in err
    assert "vqdoctor: ALERT VQ003 scale-mismatch (quantizer) @step 0:" in err
    assert err.count("vqdoctor: ALERT VQ003") == 1
    assert "trained scale-mismatch" in proc.stdout  # the command's own output passes through


def test_fail_on_turns_an_error_finding_into_exit_1(runs):
    healthy, _, _ = _done(runs, "healthy")
    assert healthy.returncode == 0, _explain(healthy)
    assert "healthy: no problems found" in healthy.stderr
    mismatch, _, _ = _done(runs, "scale-mismatch")
    assert mismatch.returncode == 1, _explain(mismatch)
    # without --fail-on the command's exit code (0) passes through a failing diagnosis
    frozen, _, _ = _done(runs, "frozen-codebook")
    assert frozen.returncode == 0, _explain(frozen)
    assert "failing:" in frozen.stderr


def test_exit_code_passes_through(runs):
    proc, run_dir, _ = _done(runs, "non-finite")
    assert proc.returncode == 3, _explain(proc)
    assert "vqdoctor: warning: the command exited with status 3" in proc.stderr
    meta = read_meta(run_dir)
    assert meta["exit_code"] == 3 and meta["status"] == "failed"


def test_a_script_that_raises(runs):
    proc, run_dir, _ = _done(runs, "loss-divergence")
    assert proc.returncode == 1, _explain(proc)
    assert "RuntimeError: the loss diverged" in proc.stderr
    _, streams = load_records(run_dir)
    end = [r for r in streams[0] if r["t"] == "end"]
    assert end and end[-1]["status"] == "failed"  # the watch saw the exception (sys.excepthook)
    assert read_meta(run_dir)["status"] == "failed"


def test_sigkill_of_the_training_leaves_a_usable_run(runs):
    proc, run_dir, root = _done(runs, "dead-codes")
    assert proc.returncode == 128 + 9, _explain(proc)
    meta = read_meta(run_dir)
    assert meta["status"] == "failed" and meta["exit_code"] == 137
    df = vqdoctor.load_run(run_dir)
    steps = sorted(set(df["step"]))
    assert steps[:100] == list(range(100)) and steps[-1] < 110  # at most the unflushed interval lost
    report = json.loads((root / "report-dead-codes.json").read_text())
    assert report["source"]["status"] == "failed"
    assert not (root / "losses-dead-codes.json").exists()


def _hist_total(run_dir: Path) -> np.ndarray:
    _, streams = load_records(run_dir)
    return sum(np.asarray(r["counts"], dtype=np.int64) for recs in streams.values() for r in recs
               if r["t"] == "hist")


def test_ddp_ranks_aggregate_to_the_single_process_figures(runs):
    proc, run_dir, _ = _done(runs, "ddp-sync")
    single, single_dir, _ = _done(runs, "ddp-single")
    assert proc.returncode == 0, _explain(proc)
    assert single.returncode == 0, _explain(single)
    meta, streams = load_records(run_dir)
    assert sorted(streams) == [0, 1] and meta["world_size"] == 2
    for rank in (0, 1):
        steps = sorted({r["step"] for r in streams[rank] if r["t"] == "step"})
        assert steps == list(range(60)), rank
    # global usage: the hist records summed over ranks are exactly the single process's counts
    np.testing.assert_array_equal(_hist_total(run_dir), _hist_total(single_dir))
    ddp, one = vqdoctor.report(run_dir), vqdoctor.report(single_dir)
    assert ddp.source["world_size"] == 2 and one.source["world_size"] == 1
    m2, m1 = ddp.quantizers[0].metrics, one.quantizers[0].metrics
    assert m2["window_tokens"] == m1["window_tokens"] == 60 * 128
    assert m2["perplexity_window"] == pytest.approx(m1["perplexity_window"], rel=1e-12)
    assert m2["usage_window"] == m1["usage_window"]
    assert "rank-desync" not in {f.id for f in ddp.findings}


def test_ddp_ema_without_all_reduce_is_rank_desync(runs):
    proc, run_dir, _ = _done(runs, "ddp-desync")
    assert proc.returncode == 0, _explain(proc)
    report = vqdoctor.report(run_dir)
    top = report.findings[0]
    assert (top.id, top.code) == ("rank-desync", "VQ011"), [(f.id, f.step) for f in report.findings]
    assert top.step is not None
