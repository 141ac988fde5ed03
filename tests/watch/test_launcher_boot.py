"""The start-up hook the launcher injects (`vqdoctor/live/_boot/sitecustomize.py`) and its agent.

These run Python with the launcher's environment only (PYTHONPATH + VQDOCTOR_WATCH), no
vqdoctor parent: the hook must be invisible to programs that never import torch, chain to the
`sitecustomize` it shadows, and never break a program, whatever fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vqdoctor
from tests.watch.launcher_scripts import ROOTS
from vqdoctor.live.launcher import BOOT_DIR, ENV_CONFIG, watch_config, watch_env
from vqdoctor.live.store import load_records, read_meta

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library


def _env(run_dir: Path, *pythonpath: Path, config: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_CONFIG}
    # an existing PYTHONPATH stays last: the version matrix puts another library release on it
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (BOOT_DIR, *pythonpath, env.get("PYTHONPATH", "")) if p)
    env[ENV_CONFIG] = config if config is not None else json.dumps(
        {"run_dir": str(run_dir), "flush_every": 10, "stats_every": 5, "command": ["python", "x.py"]})
    return env


def _python(code_or_script: str | Path, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(code_or_script), *args] if isinstance(code_or_script, Path) else \
        [sys.executable, "-c", code_or_script, *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_program_without_torch_is_untouched(tmp_path):
    code = ("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'vqdoctor', 'numpy', 'json')))")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    proc = _python(code, _env(tmp_path / "run"), tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    watched = eval(proc.stdout)  # noqa: S307 - our own printed list
    assert not any(m.startswith(("torch", "vqdoctor", "numpy")) for m in watched)
    assert set(watched) - set(eval(plain.stdout)) <= {"json", "json.decoder", "json.scanner", "json.encoder"}
    assert not (tmp_path / "run").exists()


def test_chains_to_the_sitecustomize_it_shadows(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\nMARK = 1\n")
    code = "import os, sitecustomize; print(os.environ.get('USER_SITECUSTOMIZE'), getattr(sitecustomize, 'MARK', None))"
    proc = _python(code, _env(tmp_path / "run", user), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ran", "1"]


def test_a_failing_user_sitecustomize_is_reported_and_the_program_runs(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("raise ValueError('broken site setup')\n")
    proc = _python("print('program ran')", _env(tmp_path / "run", user), tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "program ran"
    assert "Error in sitecustomize" in proc.stderr and "broken site setup" in proc.stderr


def test_a_bad_configuration_is_one_warning_line(tmp_path):
    proc = _python("print('program ran')", _env(tmp_path / "run", config="{not json"), tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "program ran"
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("vqdoctor: warning: bad VQDOCTOR_WATCH configuration")
    assert line.endswith("the program runs unwatched")


def test_a_broken_vqdoctor_never_breaks_the_training(tmp_path):
    # a `vqdoctor` that raises on import shadows the real one: the agent cannot start
    fake = tmp_path / "fake"
    (fake / "vqdoctor").mkdir(parents=True)
    (fake / "vqdoctor" / "__init__.py").write_text("raise RuntimeError('vqdoctor is broken')\n")
    script = tmp_path / "roots.py"
    script.write_text(ROOTS)
    proc = _python(script, _env(tmp_path / "run", fake), tmp_path, "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "roots ok"
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("vqdoctor:")]
    assert len(warnings) == 1, proc.stderr
    assert "could not start the watch (RuntimeError: vqdoctor is broken)" in warnings[0]
    assert not (tmp_path / "run").exists()


def test_the_root_is_the_model_holding_the_quantizer(tmp_path):
    script = tmp_path / "roots.py"
    script.write_text(ROOTS)
    run = tmp_path / "run"
    proc = _python(script, _env(run), tmp_path, "30")
    assert proc.returncode == 0, proc.stderr
    assert "vqdoctor: watching AE: 1 quantizer (vq)" in proc.stderr
    meta, streams = load_records(run)
    assert [q["name"] for q in meta["quantizers"]] == ["vq"]
    assert meta["status"] == "finished" and meta["command"] == ["python", "x.py"]
    df = vqdoctor.load_run(run)
    assert sorted(set(df["step"])) == list(range(30))  # the clock: 30 optimizer steps
    run_rows = df[df["quantizer"] == ""]
    # the whole model was found (not the encoder alone): its encoder-side gradients are measured
    assert run_rows["grad_norm_encoder"].notna().any()
    assert run_rows["loss"].notna().sum() == 30
    assert any(r["t"] == "end" and r["status"] == "finished" for r in streams[0])


def test_watch_env_puts_the_boot_folder_first_once():
    config = watch_config(Path("runs/x"), ["python", "t.py"], flush_every=7)
    env = watch_env(config, {"PYTHONPATH": os.pathsep.join(["/a", str(BOOT_DIR), "/b"]), "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(BOOT_DIR), "/a", "/b"]
    assert env["X"] == "1"
    got = json.loads(env[ENV_CONFIG])
    assert got["run_dir"] == str(Path("runs/x").resolve()) and got["flush_every"] == 7
    assert got["command"] == ["python", "t.py"]
    assert Path(got["path"], "vqdoctor", "__init__.py").is_file()
    assert (BOOT_DIR / "sitecustomize.py").is_file()


@pytest.mark.parametrize("exists", [True, False])
def test_meta_is_finalized_with_the_exit_code(tmp_path, exists):
    from vqdoctor.live.launcher import finalize_meta
    from vqdoctor.live.store import write_json_atomic

    if exists:
        write_json_atomic(tmp_path / "meta.json", {"status": "finished", "ended": "x"})
    assert finalize_meta(tmp_path, 0) == ("finished")
    assert finalize_meta(tmp_path, 9) == "failed"
    meta = read_meta(tmp_path)
    assert meta["exit_code"] == 9 and meta["status"] == "failed" and meta["ended"]
