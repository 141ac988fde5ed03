"""`vqdoctor watch RUN_DIR`, `vqdoctor report RUN_DIR`, `vqdoctor watch -- CMD` edge cases and
`vqdoctor gate -- CMD`, through the CLI in-process (`CliRunner`); the live panel's pieces.

Runs are recorded in-process with `vqdoctor.watch` around real tiny trainings; commands that
`watch -- CMD` starts are real subprocesses.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import vqdoctor
from tests.watch.watch_models import BrokenSTQuantizer, QuantAE, lucid_vq, make_data, train
from vqdoctor.cli import app
from vqdoctor.cli.panel import PinnedDisplay, WatchPanel, follow_run, open_display
from vqdoctor.live.store import StoreTail as RunTail
from vqdoctor.live.store import write_json_atomic

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

SMOKE = Path(__file__).parents[1] / "examples" / "ci" / "smoke_train.py"


def record(run_dir: Path, model: torch.nn.Module, steps: int = 100, **kw: Any) -> Path:
    with vqdoctor.watch(model, run_dir, flush_every=25, stats_every=5) as doctor:
        train(model, make_data(steps), doctor=doctor, **kw)
    return run_dir


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-watch")
    torch.manual_seed(0)
    healthy = QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8))
    broken = QuantAE(BrokenSTQuantizer(beta=0.0), name="quantize", unpack=lambda o: (o[0], o[1]))
    return {"healthy": record(root / "healthy", healthy, 150), "broken": record(root / "broken", broken)}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: Any):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vqdoctor: error: ")
    return lines[0]


# --- vqdoctor report ---------------------------------------------------------------------------


def test_report_text_and_exit_codes(runner, recorded):
    ok = invoke(runner, "report", recorded["healthy"])
    assert ok.exit_code == 0, ok.output
    assert "healthy: no problems found" in ok.stdout + ok.stderr
    bad = invoke(runner, "report", recorded["broken"])
    assert bad.exit_code == 1
    assert "VQ007 no-encoder-gradient" in bad.stdout
    assert "(diagnosis: no-encoder-gradient)" in bad.stderr
    assert invoke(runner, "report", recorded["broken"], "--fail-on", "never").exit_code == 0


def test_report_formats_and_output_file(runner, recorded, tmp_path):
    js = invoke(runner, "report", "--format", "json", recorded["broken"])
    doc = json.loads(js.stdout)
    assert doc["schema_version"] == 1 and doc["source"]["kind"] == "run"
    assert doc["findings"][0]["id"] == "no-encoder-gradient" and doc["findings"][0]["step"] is not None
    md = invoke(runner, "report", recorded["broken"], "--format", "markdown")
    assert md.exit_code == 1 and "no-encoder-gradient" in md.stdout
    out = tmp_path / "r.json"
    res = invoke(runner, "report", recorded["healthy"], "-f", "json", "-o", out)
    assert res.exit_code == 0 and res.stdout == ""
    assert json.loads(out.read_text())["verdict"] == "healthy"


@pytest.mark.parametrize("cmd", ["report", "watch"])
@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_bad_run_dir_is_one_line_exit_2(runner, tmp_path, monkeypatch, cmd, kind):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a run")
    res = invoke(runner, cmd, path)
    assert res.exit_code == 2
    line = one_error_line(res)
    assert str(path) in line
    assert res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == (["x"] if kind != "missing" else [])


def test_report_of_a_run_that_recorded_nothing_is_exit_2(runner, tmp_path):
    write_json_atomic(tmp_path / "meta.json", {"schema_version": 1, "status": "finished", "quantizers": []})
    res = invoke(runner, "report", tmp_path)
    assert res.exit_code == 2
    assert "recorded nothing" in one_error_line(res)


# --- vqdoctor watch RUN_DIR -----------------------------------------------------------------------


def test_watch_a_finished_run(runner, recorded):
    res = invoke(runner, "watch", recorded["broken"])
    assert res.exit_code == 0, res.output  # default --fail-on never
    assert "VQ007 no-encoder-gradient" in res.stdout
    assert "vqdoctor: step 99  quantize: ppl " in res.stderr
    assert "vqdoctor: ALERT VQ007 no-encoder-gradient @step 0" in res.stderr or \
        "vqdoctor: ALERT VQ007 no-encoder-gradient (quantize)" in res.stderr
    # options may follow RUN_DIR
    res = invoke(runner, "watch", recorded["broken"], "--fail-on", "error", "--format", "json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["findings"][0]["id"] == "no-encoder-gradient"
    res = invoke(runner, "watch", "--run-dir", "x", recorded["broken"])
    assert res.exit_code == 2 and "--run-dir applies to a command" in one_error_line(res)


def test_follow_a_run_while_it_is_recorded(tmp_path):
    """The panel tails a run another thread records, raises the alert mid-run, stops at the end."""
    run_dir = tmp_path / "live"
    model = QuantAE(BrokenSTQuantizer(beta=0.0), name="quantize", unpack=lambda o: (o[0], o[1]))
    doctor = vqdoctor.watch(model, run_dir, flush_every=10, stats_every=5).start()

    def training() -> None:
        with doctor:
            train(model, make_data(80), doctor=doctor, hook=lambda i: time.sleep(0.04))

    thread = threading.Thread(target=training)
    thread.start()
    buf = io.StringIO()
    try:
        panel = follow_run(run_dir, mode="lines", console=Console(file=buf, width=200), poll=0.05,
                           every=0.0, rules_every=0.0)
    finally:
        thread.join()
    text = buf.getvalue()
    lines = [ln for ln in text.splitlines() if ln.startswith("vqdoctor: step ")]
    assert len(lines) >= 3, text  # several updates while it trained
    assert lines[-1].startswith("vqdoctor: step 79  ")
    alert = text.index("ALERT VQ007 no-encoder-gradient")
    assert alert < text.index("vqdoctor: step 79  ")  # raised before the run ended
    assert panel.status == "finished"
    (a,) = [a for a in panel.sorted_alerts() if a.id == "no-encoder-gradient"]
    assert a.step is not None and a.seen_at is not None and a.seen_at < 79


# --- vqdoctor watch -- CMD --------------------------------------------------------------------------


def test_watch_a_command_that_never_imports_torch(runner, tmp_path):
    out = tmp_path / "out.txt"
    code = f"open({str(out)!r}, 'w').write('ran')"
    res = invoke(runner, "watch", "--run-dir", tmp_path / "run", "--", sys.executable, "-c", code)
    assert res.exit_code == 0, res.output
    assert out.read_text() == "ran"
    assert "vqdoctor: warning: nothing was recorded" in res.stderr
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["exit_code"] == 0
    assert meta["command"] == [sys.executable, "-c", code]
    # nothing to diagnose: CI asked for a verdict, so that is "could not analyse"
    res = invoke(runner, "watch", "--run-dir", tmp_path / "run2", "--fail-on", "error", "--",
                 sys.executable, "-c", "pass")
    assert res.exit_code == 2
    # the command's own exit code wins, with or without --
    res = invoke(runner, "watch", "--run-dir", tmp_path / "run3", sys.executable, "-c",
                 "import sys; sys.exit(4)")
    assert res.exit_code == 4
    assert "the command exited with status 4" in res.stderr


def test_watch_command_bad_input(runner, tmp_path, recorded):
    res = invoke(runner, "watch", "--")
    assert res.exit_code == 2 and "no command after --" in one_error_line(res)
    res = invoke(runner, "watch")
    assert res.exit_code == 2 and "nothing to watch" in one_error_line(res)
    res = invoke(runner, "watch", "--run-dir", recorded["healthy"], "--", sys.executable, "-c", "pass")
    assert res.exit_code == 2 and "already holds a run" in one_error_line(res)
    res = invoke(runner, "watch", "--run-dir", tmp_path / "r", "--", "no-such-command-vqd")
    assert res.exit_code == 2 and "command not found: no-such-command-vqd" in one_error_line(res)
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    res = invoke(runner, "watch", "--run-dir", tmp_path / "r", "--", script)
    assert res.exit_code == 2 and "not an executable" in one_error_line(res)
    assert not (tmp_path / "r").exists()  # nothing is created for a command that cannot start
    res = invoke(runner, "watch", "no-such-run-or-command")
    assert res.exit_code == 2 and "no such run directory or command" in one_error_line(res)


# --- vqdoctor gate -- CMD -------------------------------------------------------------------------


def test_gate_runs_a_command_watched(runner, tmp_path):
    res = invoke(runner, "gate", "--run-dir", tmp_path / "bug", "--", sys.executable, SMOKE,
                 "--out", tmp_path / "smoke", "--bug", "--steps", "100")
    assert res.exit_code == 1, res.output
    assert "gate failed" in res.stderr
    assert (tmp_path / "bug" / "rank0.jsonl").is_file()
    js = invoke(runner, "gate", "--format", "json", "--run-dir", tmp_path / "crash", "--",
                sys.executable, "-c", "import sys; sys.exit(3)")
    assert js.exit_code == 1, js.output
    doc = json.loads(js.stdout)
    assert doc["exit_code"] == 3 and doc["outcome"] == "fail"
    (training,) = [c for c in doc["checks"] if c["check"] == "training"]
    assert training["status"] == "fail" and "exited with code 3" in training["message"]
    res = invoke(runner, "gate", tmp_path / "bug", "--", sys.executable, "-c", "pass")
    assert res.exit_code == 2


# --- the panel's pieces ---------------------------------------------------------------------------


def test_run_tail_reads_increments_and_skips_a_torn_line(tmp_path):
    stream = tmp_path / "rank0.jsonl"
    stream.write_text('{"t": "start", "step": 0}\n{"t": "step", "step": 0, "q": "a", "perplexity": 2}\n{"t": "st')
    tail = RunTail(tmp_path)
    assert [r["t"] for _, r in tail.poll()] == ["start", "step"]
    assert tail.poll() == []
    with open(stream, "a") as f:  # the torn line completes, then garbage, then a new session
        f.write('ep", "step": 1, "q": "a"}\nnot json\n{"t": "start", "step": 5}\n')
    new = [r for _, r in tail.poll()]
    assert [(r["t"], r["step"]) for r in new] == [("step", 1), ("start", 5)]
    assert tail.streams[0] == [{"t": "start", "step": 5}]


def test_panel_alert_keeps_the_earliest_step(recorded):
    panel = WatchPanel(recorded["broken"])
    first = panel.refresh(rules=True)
    assert {a.id for a in first} >= {"no-encoder-gradient"}
    assert panel.refresh(rules=True) == []  # nothing new: no alert raised twice
    assert panel.current_report() is not None
    line = panel.status_line()
    assert line.startswith("step 99  quantize: ppl ") and "loss " in line


def test_pinned_display_confines_scrolling_and_restores_the_terminal(recorded):
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=100, height=30, color_system=None)
    panel = WatchPanel(recorded["healthy"])
    display = open_display(panel, mode="pinned", console=con, title="python train.py")
    assert isinstance(display, PinnedDisplay)
    display.update(final=True)
    display.close()
    text = buf.getvalue()
    assert "\x1b[1;" in text and "r\x1b8" in text  # a scroll region above the panel
    assert text.rstrip().endswith("\x1b[r\x1b8")  # reset at the end
    assert "vqdoctor watch" in text and "quantizer" in text and "no alerts" in text
