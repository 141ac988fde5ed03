"""Hostile but small inputs (tests/hostile_inputs.py): one line, exit 2, bounded memory, nothing runs.

Each class of the hostile-input issue is built here the way an attacker or a broken tool would
(stride-0 and overlapping views written with torch's own rebuild function, archives deflated
from gigabytes of zeros, lying headers, pickles nested 100 000 deep or sharing one dict 2^40
ways, K = 0 / D = 0 / meta / integer / complex codebooks, odd probes, STACK_GLOBAL and numpy
payloads, a TorchScript archive) and read through the real CLI. The light cases run in this
process; the cases that declare or inflate to gigabytes run together in one child process
whose own peak RSS comes back from `os.wait4` (a regression then costs the child, not pytest).
Wall times are measured by `benchmarks/hostile_inputs.py`, not asserted here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.hostile_inputs import CASES, Case, build_all, side_effects
from vqdoctor.cli import app

ROOT = Path(__file__).parents[1]
RSS_LIMIT_MIB = 1024


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    pytest.importorskip("vector_quantize_pytorch")
    folder = tmp_path_factory.mktemp("hostile")
    return folder, build_all(folder)


def _check(case: Case, exit_code: int, stdout: str, stderr: str) -> None:
    lines = stderr.splitlines()
    if case.analysed:
        assert exit_code in (0, 1), (case.name, exit_code, stderr)
        assert stdout and not any(ln.startswith("vqdoctor: error") for ln in lines), stderr
        return
    assert exit_code == 2, (case.name, exit_code, stdout, stderr)
    assert stdout == "", (case.name, stdout)
    assert len(lines) == 1, (case.name, stderr)
    (line,) = lines
    assert line.startswith("vqdoctor: error: "), (case.name, line)
    assert "internal error" not in line and "please report" not in line and "Traceback" not in line
    for fragment in case.expect:
        assert fragment in line, (case.name, fragment, line)


@pytest.mark.parametrize("case", [c for c in CASES if not c.heavy], ids=lambda c: c.name)
def test_light_hostile_input_gets_one_line(built: tuple[Path, dict[str, list[str]]], case: Case) -> None:
    folder, args = built
    result = CliRunner().invoke(app, ["inspect", *args[case.name]])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    _check(case, result.exit_code, result.stdout, result.stderr)
    assert side_effects(folder) == []


DRIVER = r"""
import json, sys, time
from typer.testing import CliRunner
from vqdoctor.cli import app
out = []
for name, args in json.loads(sys.argv[1]).items():
    t = time.perf_counter()
    r = CliRunner().invoke(app, ["inspect", *args])
    out.append({"name": name, "exit": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                "wall_s": time.perf_counter() - t})
print(json.dumps(out))
"""


def _run_measured(cmd: list[str], timeout: float) -> tuple[int | str, str, str, float]:
    """(exit code or "killed", stdout, stderr, peak RSS in MiB of that child alone)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
    deadline = time.monotonic() + timeout
    # the pipes are drained by a reader thread so a chatty child cannot block on a full pipe
    import threading

    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda n=n, f=f: chunks.__setitem__(n, f.read()))
               for n, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    status: Any = None
    while status is None:
        pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status = st
        elif time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            status = "killed"
        else:
            time.sleep(0.05)
    proc.returncode = 0  # reaped by wait4 above; keep Popen from waiting again
    for t in readers:
        t.join()
    code = status if status == "killed" else os.waitstatus_to_exitcode(status)
    return code, chunks["out"].decode(), chunks["err"].decode(), usage.ru_maxrss / 1024


def test_heavy_hostile_inputs_stay_small_in_a_real_process(built: tuple[Path, dict[str, list[str]]]) -> None:
    """Inputs that declare or inflate to 2-40 GB: one line each, and the process never grows past 1 GiB."""
    folder, args = built
    heavy = {c.name: args[c.name] for c in CASES if c.heavy}
    code, out, err, rss_mib = _run_measured([sys.executable, "-c", DRIVER, json.dumps(heavy)], 240)
    assert code == 0, (code, err[-2000:])
    results = {r["name"]: r for r in json.loads(out)}
    assert set(results) == set(heavy)
    for case in CASES:
        if case.heavy:
            r = results[case.name]
            _check(case, r["exit"], r["stdout"], r["stderr"])
    assert rss_mib < RSS_LIMIT_MIB, f"peak RSS {rss_mib:.0f} MiB"
    assert side_effects(folder) == []


def test_one_heavy_input_through_python_m_vqdoctor(built: tuple[Path, dict[str, list[str]]]) -> None:
    """The real entry point: `python -m vqdoctor inspect` on the 65536 x 4096 expanded codebook."""
    _, args = built
    (case,) = [c for c in CASES if c.name == "expanded-codebook"]
    code, out, err, rss_mib = _run_measured(
        [sys.executable, "-m", "vqdoctor", "inspect", *args[case.name]], 120)
    _check(case, code, out, err)
    assert rss_mib < RSS_LIMIT_MIB, f"peak RSS {rss_mib:.0f} MiB"


def test_small_expanded_views_are_read_and_the_budget_is_an_option(tmp_path: Path) -> None:
    """A small expanded view (a buffer saved from `.expand`) is read under the default budget;
    a budget below the codebook refuses it with one line naming the option; a bad size is usage."""
    import torch

    from tests.hostile_inputs import lucidrains_state

    sd = lucidrains_state()
    sd["vq._codebook.cluster_size"] = torch.ones(1, 1).expand(1, 64)  # legit: saved from a view
    path = tmp_path / "expanded-counts.pt"
    torch.save(sd, path)
    ok = CliRunner().invoke(app, ["inspect", str(path)])
    assert ok.exit_code in (0, 1), ok.stderr
    refused = CliRunner().invoke(app, ["inspect", str(path), "--max-memory", "1KiB"])
    assert refused.exit_code == 2
    (line,) = refused.stderr.splitlines()
    assert "--max-memory" in line and "1 KiB memory budget" in line
    usage = CliRunner().invoke(app, ["inspect", str(path), "--max-memory", "lots"])
    assert usage.exit_code == 2 and "--max-memory" in usage.stderr
