"""Hostile but small inputs through `vqdoctor inspect`: exit code, stderr lines, wall time, peak RSS.

    python benchmarks/hostile_inputs.py [--only NAME ...] [--timeout 60] [--keep DIR]

Builds every case of `tests/hostile_inputs.py` (expanded and overlapping views, archives that
inflate to gigabytes, lying headers, deep nesting, odd codebooks and probes, malicious pickles),
then runs each as `python -m vqdoctor inspect ARGS` in a fresh process and reads that process's
own peak RSS from `os.wait4` (Linux: ru_maxrss in KiB). Prints a markdown table; the targets are
one stderr line, exit 2, under 5 s and under 1 GB. The floor (`python -c "import torch,
vqdoctor.cli"`) is measured the same way, first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hostile_inputs import CASES, build_all, side_effects  # noqa: E402


def run(cmd: list[str], timeout: float) -> dict:
    """Run `cmd`; its exit code, stderr, wall time and peak RSS (its own, from wait4)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = t + timeout
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.send_signal(signal.SIGKILL)
            killed = True
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(errors="replace"), proc.stderr.read().decode(errors="replace")
    return {"rc": "killed" if killed else proc.returncode, "stdout": out, "stderr": err,
            "wall_s": wall, "rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="case names")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--keep", type=Path, help="build the cases here and keep them")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="vqdoctor-hostile-"))
    try:
        t = time.perf_counter()
        built = build_all(folder, args.only)
        print(f"built {len(built)} cases in {time.perf_counter() - t:.1f} s "
              f"({sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 1e6:.1f} MB on disk)",
              file=sys.stderr)
        floor = run([sys.executable, "-c", "import torch, vqdoctor.cli"], args.timeout)
        print(f"floor (`import torch, vqdoctor.cli`): {floor['wall_s']:.2f} s, {floor['rss_mib']:.0f} MiB\n")
        print("| case | what | exit | stderr lines | wall (s) | peak RSS (MiB) | first stderr line |")
        print("|---|---|---:|---:|---:|---:|---|")
        worst = {"wall_s": 0.0, "rss_mib": 0.0}
        for case in CASES:
            if case.name not in built:
                continue
            r = run([sys.executable, "-m", "vqdoctor", "inspect", *built[case.name]], args.timeout)
            lines = r["stderr"].splitlines()
            first = (lines[0] if lines else "").replace(str(folder), "…").replace("|", "\\|")
            if len(first) > 140:
                first = first[:137] + "..."
            print(f"| {case.name} | {case.what} | {r['rc']} | {len(lines)} | {r['wall_s']:.2f} | "
                  f"{r['rss_mib']:.0f} | {first} |", flush=True)
            for k in worst:
                worst[k] = max(worst[k], r[k])
        print(f"\nworst: {worst['wall_s']:.2f} s, {worst['rss_mib']:.0f} MiB; "
              f"payload side effects: {side_effects(folder) or 'none'}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
