"""Run the zoo under vqdoctor and print how often its top answer is right.

Three sets (`--set`, default `generated`; `all` runs the first two):

- `generated`: scenarios drawn by `gen/spec.py` from seeds `--start .. --start + --n - 1`,
  split by seed into a tuning and a held-out split, labels confirmed against ablated twins
  (`gen/confirm.py`), scored by `gen/score.py` (definitions there). The held-out split is
  printed as aggregates only; its per-variant results go to `OUT/holdout_private.json`.
- `thirdparty`: re-implementations of public VQ-VAE repositories' own model and loop with
  their reported bug (`thirdparty/*.py`), each against its fix.
- `legacy`: the 30 hand-written `scenarios/*.py`, as before (described below).

    python benchmarks/zoo/run.py --set generated --n 300 --jobs 2 --out zoo-out
    python benchmarks/zoo/run.py --set generated --split tune --only dead-codes --limit 10 --out zoo-out
    python benchmarks/zoo/run.py --set all --out zoo-out --tables-only     # re-print finished runs

The legacy set:

    python benchmarks/zoo/run.py --set legacy [--only PATTERN] [--jobs 2] [--out DIR] [--markdown FILE]
    python benchmarks/zoo/run.py --set legacy --out DIR --tables-only    # re-print a finished run

For every `scenarios/*.py` (its `SCENARIO` dict is read with `ast.literal_eval`, never
imported), into `DIR/<name>/`:

1. **watch**: `vqdoctor watch --run-dir DIR/<name>/run --format json --output
   DIR/<name>/watch.json -- python <script> --out DIR/<name>` (`"launch": "torchrun2"`:
   `-- python -m torch.distributed.run --standalone --nproc_per_node 2 <script> ...`). While
   the installed vqdoctor has no `watch` command the script runs bare and the watch column
   says "n/a".
2. **inspect**: `vqdoctor inspect [early.pt] final.pt --format json` (early.pt, when the
   scenario wrote one, makes the two checkpoints a time series, for drift).
3. **inspect+probe**: the same with `--probe DIR/<name>/probe.pt`.

Definitions (per mode):

- *diagnosis*: the id of the first finding of severity error or warning (findings are
  ranked root cause first); "healthy" when there is none.
- *top-1*: the diagnosis equals `SCENARIO["expect"]`. *top-3*: the expected id is among the
  first three error/warning findings (a healthy scenario: no such finding). Accuracies are
  over failure scenarios (`expect != "healthy"`), per failure mode and overall.
- *false alarm*: a healthy scenario whose report has any error or warning finding.
- *first alert* (watch only): the earliest `step` of any error/warning finding of the watch
  report with `step >= SCENARIO["onset"]`, minus the onset, in steps. Findings without a step
  are ignored; a scenario with no such finding counts as "no alert" and is left out of the
  median and max. *correct held*: the same for findings whose id is the expected one.
- A scenario that crashed, or a report vqdoctor could not produce (exit 2, shown "n/a"), counts
  as wrong; on a healthy scenario "n/a" is not a false alarm but is counted apart ("no report").
- An optional `SCENARIO["inspect_args"]` list is appended to both inspect commands (e.g.
  `["--quantizer", "vq", "--levels", "8,5,5,5"]` for an FSQ checkpoint that stores no tensor
  of its own).

Targets (issue 4): watch top-1 >= 95%, inspect with probe >= 85%, inspect alone >= 70%,
zero false alarms, first alert <= 20 steps after onset. Raw results go to DIR/results.json
(merged by scenario name with earlier runs into the same DIR; `--tables-only` prints them all).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
MODES = ("watch", "inspect", "inspect+probe")
TARGETS = {"watch": 0.95, "inspect": 0.70, "inspect+probe": 0.85}
ALERT_TARGET = 20
TIMEOUT_S = 600


def read_scenario(path: Path) -> dict:
    """The module-level `SCENARIO = {...}` literal of a scenario script (not imported)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SCENARIO" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path.name}: no SCENARIO literal")


def discover(only: str | None = None) -> list[Path]:
    """Scenario scripts, sorted; `only` is a glob or a substring of the name."""
    paths = sorted(p for p in SCENARIOS.glob("*.py") if not p.name.startswith("_"))
    if only:
        paths = [p for p in paths if fnmatch.fnmatch(p.stem, only) or only in p.stem]
    return paths


def watch_available() -> bool:
    """True when the installed vqdoctor has the `watch -- CMD` launcher."""
    r = subprocess.run(["vqdoctor", "watch", "--help"], capture_output=True, text=True)
    return r.returncode == 0


def _findings(report: dict) -> list[dict]:
    return [f for f in report.get("findings", []) if f.get("severity") in ("error", "warning")]


def judge(report: dict | None, expect: str, onset: int) -> dict:
    """Diagnosis, top-1/top-3 and alert steps of one report (None: no report)."""
    if report is None:
        return {"top": "n/a", "top3": [], "ok1": False, "ok3": False, "alert": None, "held": None}
    fs = _findings(report)
    ids = [f["id"] for f in fs]
    top = ids[0] if ids else "healthy"
    ok1 = top == expect
    ok3 = ok1 if expect == "healthy" else expect in ids[:3]
    steps = [f["step"] for f in fs if f.get("step") is not None and f["step"] >= onset]
    held = [f["step"] for f in fs if f["id"] == expect and f.get("step") is not None and f["step"] >= onset]
    return {"top": top, "top3": ids[:3], "ok1": ok1, "ok3": ok3,
            "alert": min(steps) - onset if steps else None, "held": min(held) - onset if held else None,
            "message": fs[0]["message"] if fs else ""}


def _run(cmd: list[str], log: Path) -> int:
    with log.open("w") as fh:
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[run.py] timed out after {TIMEOUT_S} s\n")
            return 124


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_scenario(path: Path, out_root: Path, use_watch: bool) -> dict:
    """Train one scenario (watched when possible), inspect its checkpoints, judge every mode."""
    sc = read_scenario(path)
    out = out_root / path.stem
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train = [sys.executable, str(path), "--out", str(out)]
    if sc.get("launch") == "torchrun2":
        train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(path), "--out", str(out)]
    t0 = time.monotonic()
    if use_watch:
        cmd = ["vqdoctor", "watch", "--run-dir", str(out / "run"), "--format", "json",
               "--output", str(out / "watch.json"), "--no-panel", "--", *train]
    else:
        cmd = train
    rc = _run(cmd, out / "train.log")
    seconds = time.monotonic() - t0
    reports: dict[str, dict | None] = {"watch": _load(out / "watch.json") if use_watch else None}
    ckpts = [str(out / n) for n in ("early.pt", "final.pt") if (out / n).exists()]
    for mode, extra in (("inspect", []), ("inspect+probe", ["--probe", str(out / "probe.pt")])):
        if not (out / "final.pt").exists():
            reports[mode] = None
            continue
        dest = out / f"{mode.replace('+', '_')}.json"
        _run(["vqdoctor", "inspect", *ckpts, *extra, *sc.get("inspect_args", []), "--format", "json",
              "--output", str(dest)],
             out / f"{mode.replace('+', '_')}.log")
        reports[mode] = _load(dest)
    res = {"name": path.stem, **sc, "rc": rc, "seconds": round(seconds, 1), "modes": {}}
    for mode in MODES:
        if mode == "watch" and not use_watch:
            res["modes"][mode] = {"top": "n/a", "top3": [], "ok1": None, "ok3": None, "alert": None, "held": None}
        else:
            res["modes"][mode] = judge(reports[mode], sc["expect"], int(sc.get("onset", 0)))
    return res


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"


def summarise(results: list[dict], use_watch: bool) -> str:
    """The markdown tables: per scenario, per failure mode, and per mode against the targets."""
    lines = ["| scenario | expect | library | K | D | watch | inspect | inspect+probe | first alert | correct held | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for mode in MODES:
            m = r["modes"][mode]
            mark = "" if m["ok1"] is None else (" ✓" if m["ok1"] else " ✗")
            cells.append(m["top"] + mark)
        w = r["modes"]["watch"]
        alert = "n/a" if not use_watch else ("-" if w["alert"] is None else str(w["alert"]))
        held = "n/a" if not use_watch else ("-" if w["held"] is None else str(w["held"]))
        crash = "" if r["rc"] in (0, 1) else f" (exit {r['rc']})"
        lines.append(f"| {r['name']}{crash} | {r['expect']} | {r['library']} | {r['K']} | {r['D']} | "
                     + " | ".join(cells) + f" | {alert} | {held} | {r['seconds']:.0f} |")
    failures = [r for r in results if r["expect"] != "healthy"]
    healthy = [r for r in results if r["expect"] == "healthy"]
    modes_ids = sorted({r["expect"] for r in failures})
    lines += ["", "| failure mode | n | " + " | ".join(f"{m} top-1" for m in MODES) + " |",
              "|---|---|" + "---|" * len(MODES)]
    for fid in modes_ids:
        rs = [r for r in failures if r["expect"] == fid]
        cells = [("n/a" if mode == "watch" and not use_watch else _pct(sum(r["modes"][mode]["ok1"] for r in rs), len(rs)))
                 for mode in MODES]
        lines.append(f"| {fid} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", "| mode | top-1 (target) | top-3 | false alarms on healthy (target 0) | no report (healthy) | "
                  f"first alert: median / max steps after onset (target <= {ALERT_TARGET}) | correct finding held: median / max |",
              "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        if mode == "watch" and not use_watch:
            lines.append(f"| watch | n/a (>= {TARGETS[mode]:.0%}) | n/a | n/a | n/a | n/a | n/a |")
            continue
        ok1 = sum(r["modes"][mode]["ok1"] for r in failures)
        ok3 = sum(r["modes"][mode]["ok3"] for r in failures)
        fa = sum(r["modes"][mode]["top"] not in ("healthy", "n/a") for r in healthy)
        nr = sum(r["modes"][mode]["top"] == "n/a" for r in healthy)
        if mode == "watch":
            def mm(key: str) -> str:
                v = [r["modes"]["watch"][key] for r in failures if r["modes"]["watch"][key] is not None]
                none = len(failures) - len(v)
                s = f"{statistics.median(v):g} / {max(v)}" if v else "-"
                return s + (f" ({none} without)" if none else "")
            alert, held = mm("alert"), mm("held")
        else:
            alert = held = "n/a (no steps)"
        lines.append(f"| {mode} | {_pct(ok1, len(failures))} ({TARGETS[mode]:.0%}) | {_pct(ok3, len(failures))} | "
                     f"{fa}/{len(healthy)} | {nr}/{len(healthy)} | {alert} | {held} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the zoo under vqdoctor and print the accuracy tables.")
    ap.add_argument("--set", choices=("generated", "thirdparty", "legacy", "all"), default="generated",
                    help="which scenarios (all = generated + thirdparty)")
    ap.add_argument("--only", help="generated: a fault class id, 'healthy', a kind or a mechanism; "
                                   "legacy: a glob or substring of scenario names")
    ap.add_argument("--jobs", type=int, default=2, help="scenarios run at once")
    ap.add_argument("--out", default="zoo-out", help="output folder")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--tables-only", action="store_true", help="print the tables of an earlier run; run nothing")
    ap.add_argument("--n", type=int, default=300, help="generated: number of seeds drawn")
    ap.add_argument("--start", type=int, default=0, help="generated: first seed")
    ap.add_argument("--split", choices=("tune", "holdout", "both"), default="both", help="generated: which split")
    ap.add_argument("--limit", type=int, help="generated: at most this many variants (after --only / --split)")
    args = ap.parse_args(argv)
    if args.set == "legacy":
        return main_legacy(args)
    sys.path.insert(0, str(HERE / "gen"))
    import zoo_sets  # noqa: E402  (benchmarks/zoo/gen/zoo_sets.py)

    return zoo_sets.main(args)


def main_legacy(args: argparse.Namespace) -> int:
    """The hand-written scenarios (the set this runner started with)."""
    if args.tables_only:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        table = summarise(saved, any(r["modes"]["watch"]["ok1"] is not None for r in saved))
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return 0
    paths = discover(args.only)
    if not paths:
        print("no scenario matches", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_watch = watch_available()
    if not use_watch:
        print("vqdoctor has no `watch` launcher yet: scripts run bare, the watch column says n/a", file=sys.stderr)

    def one(p: Path) -> dict:
        r = run_scenario(p, out, use_watch)
        print(f"{r['name']}: {r['seconds']:.0f} s, exit {r['rc']}, "
              + ", ".join(f"{m} {r['modes'][m]['top']}" for m in MODES), file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, paths))
    saved = {}  # results.json keeps every scenario ever run into DIR; this run's replace theirs
    if (out / "results.json").exists():
        saved = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    saved.update({r["name"]: r for r in results})
    (out / "results.json").write_text(json.dumps(sorted(saved.values(), key=lambda r: r["name"]), indent=1))
    table = summarise(results, use_watch)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
