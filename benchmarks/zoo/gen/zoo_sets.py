"""`run.py --set generated|thirdparty|all`: run, save, and print the tables (held-out protected).

Files under `--out`:

- `tune_results.json`: every tuning-split variant (per-variant rows, reasons, diagnoses);
- `holdout_private.json`: every held-out variant, per variant. **Not to be read while changing
  rules**; the runner itself prints only its aggregates;
- `thirdparty_results.json`: the third-party cases;
- `summary.json`: aggregates only (both splits, per library version, per fault class);
- `tables.md` (or `--markdown FILE`): the printed tables.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import runner
import score
import spec as S

FILES = {"tune": "tune_results.json", "holdout": "holdout_private.json", "thirdparty": "thirdparty_results.json"}


def _merge(out: Path, key: str, rows: list[dict]) -> list[dict]:
    path = out / FILES[key]
    saved = {}
    if path.exists():
        saved = {r["id"]: r for r in json.loads(path.read_text())}
    saved.update({r["id"]: r for r in rows})
    merged = sorted(saved.values(), key=lambda r: r["id"])
    path.write_text(json.dumps(merged, indent=1))
    return merged


def _saved(out: Path, key: str) -> list[dict]:
    path = out / FILES[key]
    return json.loads(path.read_text()) if path.exists() else []


def select(args: Any) -> list[dict]:
    """The specs this invocation runs (seeds, split, --only, --limit)."""
    specs = S.draw_many(args.n, args.start)
    if args.split != "both":
        specs = [s for s in specs if s["split"] == args.split]
    if args.only:
        specs = [s for s in specs if args.only in (s["expect"], s["kind"], s["mechanism"], s["variant"])]
    return specs[: args.limit] if args.limit else specs


def tables(out: Path, with_thirdparty: bool) -> str:
    tune, hold = _saved(out, "tune"), _saved(out, "holdout")
    parts = ["## Generated zoo", ""]
    total = tune + hold
    conf = [r for r in total if r.get("confirmed")]
    parts.append(f"{len(total)} variants drawn, {len(conf)} confirmed "
                 f"({sum(r['expect'] != 'healthy' for r in conf)} faulty, {sum(r['expect'] == 'healthy' for r in conf)} "
                 f"healthy, of which {sum(bool(r.get('imperfect')) for r in conf)} imperfect), "
                 f"{len(total) - len(conf)} dropped.")
    parts += ["", score.holdout_tables(hold) if hold else "(no held-out variants run)", "",
              score.tune_tables(tune) if tune else "(no tuning variants run)"]
    if with_thirdparty:
        tp = _saved(out, "thirdparty")
        parts += ["", score.thirdparty_tables(tp) if tp else "(no third-party cases run)"]
    return "\n".join(parts)


def summary(out: Path) -> dict[str, Any]:
    """Aggregates only (safe to read): per split, per library version, per fault class."""
    res: dict[str, Any] = {}
    for key in ("tune", "holdout"):
        rows = _saved(out, key)
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(score.version_group(r), []).append(r)
        classes: dict[str, list] = {}
        for r in rows:
            classes.setdefault(r["expect"], []).append(r)
        res[key] = {"all": score.aggregate(rows), "drawn": len(rows),
                    "versions": {g: score.aggregate(v) for g, v in groups.items()},
                    "classes": {c: score.aggregate(v) for c, v in classes.items()}}
    return res


def main(args: Any) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with_tp = args.set in ("thirdparty", "all")
    if not args.tables_only:
        t0 = time.monotonic()
        if args.set in ("generated", "all"):
            specs = select(args)
            if not specs:
                print("no variant matches", file=sys.stderr)
                return 2
            if any(s["libver"] == "1.32.0" for s in specs):
                runner.ensure_overlay(lambda m: print(m, file=sys.stderr))
            done = {"tune": 0, "holdout": 0}
            n_split = {k: sum(s["split"] == k for s in specs) for k in done}

            def one(sp: dict) -> dict:
                r = runner.run_variant(sp, out)
                done[sp["split"]] += 1
                if sp["split"] == "tune":
                    modes = ", ".join(f"{m} {j['top']}" for m, j in r["modes"].items())
                    print(f"tune {r['id']} {r['expect']} ({r['kind']}): "
                          + (modes if r["confirmed"] else "dropped: " + r["reason"][:100]), file=sys.stderr, flush=True)
                else:  # held-out: progress only, never a result
                    print(f"holdout: {done['holdout']}/{n_split['holdout']} done", file=sys.stderr, flush=True)
                return r

            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                rows = list(pool.map(one, specs))
            _merge(out, "tune", [r for r in rows if r["split"] == "tune"])
            _merge(out, "holdout", [r for r in rows if r["split"] == "holdout"])
        if with_tp:
            paths = sorted((runner.ZOO / "thirdparty").glob("*.py"))
            paths = [p for p in paths if not p.name.startswith("_")]
            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                tp = list(pool.map(lambda p: runner.run_case(p, out), paths))
            _merge(out, "thirdparty", tp)
        wall = time.monotonic() - t0
        print(f"wall time {wall:.0f} s", file=sys.stderr)
        (out / "wall_seconds.txt").write_text(f"{wall:.0f}\n")
    (out / "summary.json").write_text(json.dumps(summary(out), indent=1))
    text = tables(out, with_tp)
    print(text)
    (Path(args.markdown) if args.markdown else out / "tables.md").write_text(text + "\n")
    return 0
