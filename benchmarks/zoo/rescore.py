"""Re-diagnose a finished generated-zoo run with the installed vqdoctor, in one process.

    python benchmarks/zoo/rescore.py --out zoo-out --split tune       # full tables
    python benchmarks/zoo/rescore.py --out zoo-out --split holdout    # aggregates only

The trainings, twins and label checks of `run.py` are reused as they are; only the diagnoses
change: `watch` is `vqdoctor.report(RUN_DIR)` over the run the watch recorded (so a change to what
the recorder records needs the trainings re-run: delete `watch.json` and run `run.py` again),
`inspect` / `inspect+probe` are `vqdoctor.inspect(...)`. A variant's report that vqdoctor cannot
make reads "n/a" as in `run.py`. The held-out protocol holds here too: for `--split holdout` only
the aggregates are printed and nothing per variant is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "gen"))

import score  # noqa: E402
import spec as S  # noqa: E402

FILES = {"tune": "tune_results.json", "holdout": "holdout_private.json"}


def _kwargs(args: list[str]) -> dict[str, Any]:
    """`inspect` keyword arguments from a spec's `inspect_args` (command-line form)."""
    out: dict[str, Any] = {}
    it = iter(args)
    for a in it:
        if a == "--quantizer":
            out.setdefault("quantizers", []).append(next(it))
        elif a == "--levels":
            out["levels"] = [int(x) for x in next(it).split(",")]
        elif a == "--trust-checkpoint":
            out["trust_checkpoint"] = True
    return out


def _quiet(fn: Any) -> dict | None:
    import vqdoctor.errors as E

    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return fn().to_dict()
    except E.VQDoctorError:
        return None


def rediagnose(d: Path, row: dict, sp: dict) -> dict[str, dict | None]:
    """The three mode reports of one variant directory, with the installed vqdoctor."""
    import vqdoctor

    files = d / "files"
    ref = json.loads((files / "reference.json").read_text())
    names = ref.get("files", {})
    ckpts = [str(files / names[k]) for k in ("early", "final") if names.get(k) and (files / names[k]).exists()]
    kw = _kwargs(sp.get("inspect_args", []))
    reports: dict[str, dict | None] = {"watch": None, "inspect": None, "inspect+probe": None}
    if (d / "run").is_dir():
        reports["watch"] = _quiet(lambda: vqdoctor.report(d / "run"))
    if ckpts:
        reports["inspect"] = _quiet(lambda: vqdoctor.inspect(ckpts, **kw))
        reports["inspect+probe"] = _quiet(lambda: vqdoctor.inspect(ckpts, probe=str(files / "probe.pt"), **kw))
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the folder of a finished run.py --set generated")
    ap.add_argument("--split", choices=("tune", "holdout"), default="tune")
    ap.add_argument("--only", help="a fault class id, 'healthy', a kind or a mechanism")
    ap.add_argument("--save", help="tune only: write the re-scored rows to this JSON file")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = json.loads((out / FILES[args.split]).read_text())
    done = []
    for row in rows:
        if not row.get("confirmed"):
            done.append(row)
            continue
        sp = json.loads((out / args.split / row["id"] / "spec.json").read_text())
        if args.only and args.only not in (sp["expect"], sp["kind"], sp["mechanism"], sp["variant"]):
            continue
        reports = rediagnose(out / args.split / row["id"], row, sp)
        row = dict(row, modes={m: score.judge(rep, sp["expect"], sp["onset"], S.expected_quantizers(sp))
                               for m, rep in reports.items()})
        done.append(row)
    if args.split == "holdout":
        print(score.holdout_tables(done))
        return 0
    print(score.tune_tables(done))
    if args.save:
        Path(args.save).write_text(json.dumps(done, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
