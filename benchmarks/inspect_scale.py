"""Inspect a ~2 GB torch zip checkpoint: wall time and peak RSS, each in a fresh process.

    python benchmarks/inspect_scale.py [--dir benchmarks/_data] [--keep] [--repeat N]

Writes a checkpoint with a lucidrains-layout VQ-EMA codebook (K=65536, D=256) among large
unrelated tensors, then measures, each command in its own wrapper process (peak RSS of that
command alone, via RUSAGE_CHILDREN), once cold (the file evicted from the page cache) and
`--repeat` times warm (best shown: the VM is shared):
  - `python -m vqdoctor inspect FILE --format json` (when the CLI can run it),
  - `vqdoctor.diagnosis.inspect_checkpoints` (everything the CLI does but parse arguments and
    print: read, discover, metrics, rules, ranking), timed by the child after its imports,
  - `open_checkpoint` + `vqdoctor.quantizers.discover` (the library path the CLI uses), and
    `open_checkpoint` alone,
  - a plain full `torch.load(FILE, weights_only=True)` (no mmap),
  - `import torch, vqdoctor.cli` (the floor: interpreter, torch and the CLI's own imports, which
    every inspect pays before it reads a byte) and `import torch` alone.
The `import torch` floor alone is ~220 MiB, ~11% of the 1920 MiB file, so the "peak RSS under
10% of the file" target is read as RSS *added* over the `import torch, vqdoctor.cli` floor; the
table shows the absolute peak and that increment. Prints a markdown table. Linux only
(posix_fadvise, ru_maxrss in KiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True)
lines = r.stdout.decode(errors="replace").strip().splitlines()
print(json.dumps({"wall_s": time.perf_counter() - t, "rc": r.returncode,
                  "last": lines[-1] if lines else "",
                  "rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stderr": r.stderr.decode(errors="replace")[-400:]}))
"""

# Time spent after imports, printed by the child itself: wall times include interpreter start
# and `import torch`, which dominate on a small VM.
LIBRARY = """
import sys, time
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.quantizers import discover
t0 = time.perf_counter(); src = open_checkpoint(sys.argv[1]); t1 = time.perf_counter()
qs = discover(src); t2 = time.perf_counter()
print(f"open {t1 - t0:.3f} + discover {t2 - t1:.3f} ({len(qs)} quantizer)")
"""

# The whole diagnosis as the CLI runs it (`vqdoctor.cli.inspect.run_inspect`), after imports;
# CPU time too, since wall time on a shared VM includes waiting for a core.
PIPELINE = """
import sys, time
import torch, vqdoctor.cli
from vqdoctor.diagnosis import inspect_checkpoints
t0, c0 = time.perf_counter(), time.process_time()
r = inspect_checkpoints([sys.argv[1]])
print(f"inspect {time.perf_counter() - t0:.3f} (cpu {time.process_time() - c0:.3f})")
"""

OPEN_ONLY = """
import sys, time
from vqdoctor.checkpoint import open_checkpoint
t0 = time.perf_counter(); open_checkpoint(sys.argv[1]); print(f"open {time.perf_counter() - t0:.3f}")
"""


FLOOR_LABEL = "`import torch, vqdoctor.cli` (floor)"


def write_checkpoint(path: Path, blocks: int = 7) -> None:
    k, d = 65536, 256
    embed = torch.randn(1, k, d)
    cluster_size = torch.rand(1, k) * 10
    sd = {f"model.decoder.blocks.{i}.weight": torch.randn(8192, 8192) for i in range(blocks)}
    sd |= {"model.quantizer._codebook.initted": torch.tensor(True),
           "model.quantizer._codebook.cluster_size": cluster_size,
           "model.quantizer._codebook.embed_avg": embed * cluster_size[..., None],
           "model.quantizer._codebook.embed": embed}
    torch.save(sd, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # flushed pages can be evicted for the cold runs


def evict(path: Path) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(cmd: list[str], path: Path, cold: bool) -> dict:
    if cold:
        evict(path)
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def cli_works(path: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "vqdoctor", "inspect", str(path), "--format", "json"],
                       capture_output=True, text=True)
    if r.returncode not in (0, 1):
        print(f"CLI inspect not usable (exit {r.returncode}): {r.stderr.strip()[-300:]}",
              file=sys.stderr)
    return r.returncode in (0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(Path(__file__).parent / "_data"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--repeat", type=int, default=3, help="warm runs per command (best is shown)")
    args = ap.parse_args()
    path = Path(args.dir) / "inspect_scale.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        t = time.perf_counter()
        write_checkpoint(path)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size_mb = path.stat().st_size / 2**20
    py = sys.executable
    rows = []
    if cli_works(path):
        rows.append(("`vqdoctor inspect --format json` (CLI)",
                     [py, "-m", "vqdoctor", "inspect", str(path), "--format", "json"]))
    else:
        print("measuring the library path only (open_checkpoint + discover)", file=sys.stderr)
    rows += [("`inspect_checkpoints` (library: all of inspect but CLI parsing and output)",
              [py, "-c", PIPELINE, str(path)]),
             ("`open_checkpoint` + `discover` (library)", [py, "-c", LIBRARY, str(path)]),
             ("`open_checkpoint` only", [py, "-c", OPEN_ONLY, str(path)]),
             ("full `torch.load(weights_only=True)`, no mmap",
              [py, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True)", str(path)]),
             (FLOOR_LABEL, [py, "-c", "import torch, vqdoctor.cli"]),
             ("`import torch`", [py, "-c", "import torch"])]

    print(f"checkpoint: {size_mb:.0f} MiB, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n", file=sys.stderr)
    results = []
    for label, cmd in rows:
        runs = [measure(cmd, path, cold=True)]
        runs += [measure(cmd, path, cold=False) for _ in range(args.repeat)]
        if runs[0]["rc"] not in (0, 1):
            print(f"{label} failed: {runs[0]['stderr']}", file=sys.stderr)
        results.append((label, runs))
    # Peak RSS is the largest over all runs of a command, the floor's included, so the increment
    # compares like with like.
    floor = max(r["rss_kib"] for label, runs in results if label == FLOOR_LABEL for r in runs) / 1024
    print(f"checkpoint: {size_mb:.0f} MiB, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; floor = {FLOOR_LABEL} "
          f"({floor:.0f} MiB)\n")
    print("| measured | wall cold (s) | wall warm, best (s) | after imports cold / warm (s) "
          "| peak RSS (MiB) | RSS / file size | over floor (MiB) | over floor / file size |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for label, runs in results:
        best = min(runs[1:], key=lambda r: r["wall_s"])
        inner = (f"{runs[0]['last']} / {best['last']}"
                 if best["last"].startswith(("open", "inspect")) else "")
        rss = max(r["rss_kib"] for r in runs) / 1024
        print(f"| {label} | {runs[0]['wall_s']:.2f} | {best['wall_s']:.2f} | {inner} | {rss:.0f} | "
              f"{100 * rss / size_mb:.1f}% | {rss - floor:+.0f} | {100 * (rss - floor) / size_mb:+.1f}% |")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
