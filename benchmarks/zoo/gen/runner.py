"""Run generated variants (and third-party cases) under vqdoctor, confirm labels, collect results.

Per variant, into `OUT/<split>/<id>/` (cached: a step whose outputs exist for the same spec is
skipped):

1. `files/`: the variant trained under `vqdoctor watch --run-dir run --format json --output
   watch.json --no-panel -- python gen/train.py --spec spec.json --out files` (its
   `reference.json` is the run's own measurement; a watched and an unwatched run are the same
   run). If the watched run produced no reference, it is trained bare and watch reads "n/a".
2. `OUT/twins/<id>/`: the ablated twin, trained bare (faulty variants only).
3. the label check (`confirm.confirm`); unconfirmed variants stop here.
4. `inspect.json` / `inspect_probe.json`: `vqdoctor inspect [early] final --format json` without /
   with `--probe probe.pt`, plus the spec's `inspect_args`.

vector-quantize-pytorch 1.32.0 variants run with `PYTHONPATH=.matrix/vq-1.32.0` (an overlay
installed with `pip install --no-deps --target`); each run records the version it loaded and a
mismatch is an error, so the overlay is known to win in the child and under the watch.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import confirm
import score
import spec as S

GEN = Path(__file__).resolve().parent
ZOO = GEN.parent
ROOT = ZOO.parents[1]
OVERLAY = ROOT / ".matrix" / "vq-1.32.0"
TIMEOUT_S = 600
VQD = [sys.executable, "-m", "vqdoctor"]


def ensure_overlay(log=print) -> Path:
    """The vector-quantize-pytorch 1.32.0 overlay directory, installed if missing."""
    if not (OVERLAY / "vector_quantize_pytorch").is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(OVERLAY),
               "vector-quantize-pytorch==1.32.0"]
        log("installing the 1.32.0 overlay: " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    return OVERLAY


def _env(libver: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if libver == "1.32.0":
        env["PYTHONPATH"] = os.pathsep.join([str(ensure_overlay()), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    t0 = time.monotonic()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=TIMEOUT_S, env=env).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[runner] timed out after {TIMEOUT_S} s\n")
            rc = 124
    return rc, round(time.monotonic() - t0, 2)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fresh_dir(d: Path, sp: dict) -> None:
    """Reuse `d` only when it was made for this exact spec."""
    marker = d / "spec.json"
    if marker.exists() and _load(marker) == sp:
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    marker.write_text(json.dumps(sp, indent=1))


def _inspect(d: Path, files: Path, ref: dict, extra_args: list[str], times: dict) -> dict[str, dict | None]:
    names = ref.get("files", {})
    ckpts = [str(files / names[k]) for k in ("early", "final") if names.get(k) and (files / names[k]).exists()]
    reports: dict[str, dict | None] = {}
    for mode, extra in (("inspect", []), ("inspect+probe", ["--probe", str(files / "probe.pt")])):
        dest = d / f"{mode.replace('+', '_')}.json"
        if not dest.exists() and ckpts:
            _, times[mode] = _run([*VQD, "inspect", *ckpts, *extra, *extra_args, "--format", "json",
                                   "--output", str(dest)], d / f"{mode.replace('+', '_')}.log")
        reports[mode] = _load(dest)
    return reports


def _train_cmd(spec_path: Path, out: Path, twin: bool = False) -> list[str]:
    return [sys.executable, str(GEN / "train.py"), "--spec", str(spec_path), "--out", str(out)] + (["--twin"] if twin else [])


def _watched(cmd: list[str], d: Path, env: dict, times: dict) -> None:
    if not (d / "watch.json").exists():
        _, times["watch"] = _run([*VQD, "watch", "--run-dir", str(d / "run"), "--format", "json", "--output",
                                  str(d / "watch.json"), "--no-panel", "--", *cmd], d / "train.log", env)


def run_variant(sp: dict, out: Path) -> dict[str, Any]:
    """Train, confirm and diagnose one generated variant; returns its result row."""
    d = out / sp["split"] / sp["id"]
    _fresh_dir(d, sp)
    files, times = d / "files", {}
    env = _env(sp["libver"])
    if not (files / "reference.json").exists() or not (d / "watch.json").exists():
        shutil.rmtree(d / "run", ignore_errors=True)
        (d / "watch.json").unlink(missing_ok=True)
        _watched(_train_cmd(d / "spec.json", files), d, env, times)
    watched = (d / "watch.json").exists()
    if not (files / "reference.json").exists():
        _, times["bare"] = _run(_train_cmd(d / "spec.json", files), d / "train_bare.log", env)
    ref = _load(files / "reference.json")
    twin_ref = None
    if sp["fault"] != "healthy":
        tw = S.twin(sp)
        td = out / "twins" / sp["id"]
        _fresh_dir(td, tw)
        if not (td / "reference.json").exists():
            _, times["twin"] = _run(_train_cmd(td / "spec.json", td), td / "train.log", env)
        twin_ref = _load(td / "reference.json")
    ok, reason = confirm.confirm(sp, ref, twin_ref)
    loaded = (ref or {}).get("versions", {}).get("vector-quantize-pytorch")
    if ok and sp["libver"] and loaded != sp["libver"]:
        ok, reason = False, f"loaded vector-quantize-pytorch {loaded}, spec says {sp['libver']}"
    row = _row(sp, ok, reason, ref)
    row["seconds"] = times
    if ok:
        reports = {"watch": _load(d / "watch.json") if watched else None,
                   **_inspect(d, files, ref, sp["inspect_args"], times)}
        for mode, rep in reports.items():
            row["modes"][mode] = score.judge(rep, sp["expect"], sp["onset"], S.expected_quantizers(sp))
    return row


def _row(sp: dict, ok: bool, reason: str, ref: dict | None) -> dict[str, Any]:
    p = sp["pattern"]
    tags = [t for t, on in (("separate", p["separate"]), ("nested", p["nested"]), ("eval", p["eval_every"]),
                            ("accum", p["accum"] > 1), ("probe-call", p["probe_call"]),
                            ("hand-optim", p["manual_optim"])) if on]
    row = {k: sp[k] for k in ("id", "seed", "split", "kind", "library", "libver", "fault", "expect", "mechanism",
                              "variant", "onset", "K", "D", "stages", "container", "probe")}
    row.update(pattern_tag="+".join(tags) or "single", names=sp["names"], confirmed=ok, reason=reason,
               modes={}, imperfect=bool(ok and sp["fault"] == "healthy" and ref and confirm.imperfect(ref)),
               train_seconds=(ref or {}).get("train_seconds"))
    return row


# ---------------------------------------------------------------------- third-party cases

def read_case(path: Path) -> dict:
    """The module-level `CASE = {...}` literal of a third-party script (not imported)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CASE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path.name}: no CASE literal")


def run_case(path: Path, out: Path) -> dict[str, Any]:
    """Train one third-party case (watched) and its fix (bare), confirm, inspect, judge."""
    case = read_case(path)
    d, td = out / "thirdparty" / path.stem, out / "thirdparty" / (path.stem + "-fixed")
    for x in (d, td):
        x.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    cmd = [sys.executable, str(path), "--out", str(d / "files")]
    if not (d / "files" / "reference.json").exists() or not (d / "watch.json").exists():
        shutil.rmtree(d / "run", ignore_errors=True)
        (d / "watch.json").unlink(missing_ok=True)
        _watched(cmd, d, dict(os.environ), times)
    if not (td / "reference.json").exists():
        _, times["twin"] = _run([sys.executable, str(path), "--out", str(td), "--fixed"], td / "train.log")
    ref, twin_ref = _load(d / "files" / "reference.json"), _load(td / "reference.json")
    pseudo = {"fault": case["expect"], "mechanism": case.get("mechanism"), "onset": case.get("onset", 0),
              "learn": case.get("learn", "ema"), "K": case["K"]}
    if ref is None or twin_ref is None:
        ok, reason = False, "training failed"
    else:  # the fix need not make the whole run healthy: the reported bug's signature must go
        ok, reason = confirm.signature(pseudo, ref, twin_ref)
    row = {"id": path.stem, "follows": f"{case['repo']}@{case['commit'][:7]} ({case['issue']})",
           "expect": case["expect"], "accept": case.get("accept", []), "confirmed": ok, "reason": reason,
           "modes": {}, "seconds": times, "libver": None, "K": case["K"], "stages": case.get("stages", 1)}
    expected_q = [{"K": case["K"], "count": case.get("stages", 1)}]
    reports = {"watch": _load(d / "watch.json"), **_inspect(d, d / "files", ref or {}, case.get("inspect_args", []), times)}
    for mode, rep in reports.items():
        j = score.judge(rep, case["expect"], case.get("onset", 0), expected_q)
        j["ok1"] = j["top"] == case["expect"] or j["top"] in row["accept"]
        row["modes"][mode] = j
    return row
