"""Run-store readers: bad directories get one clear line; torn and reused streams are read tolerantly."""

from __future__ import annotations

import json

import pytest

import vqdoctor
from vqdoctor.errors import RunStoreError
from vqdoctor.live.store import RunStore, load_records


def _write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_bad_run_dir_is_one_line_error(tmp_path, kind):
    target = tmp_path / "run"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    with pytest.raises(RunStoreError) as err:
        vqdoctor.load_run(target)
    assert "\n" not in str(err.value) and str(target) in str(err.value)
    with pytest.raises(RunStoreError):
        vqdoctor.report(target)


def test_torn_line_and_reused_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = [{"t": "start", "rank": 0, "world_size": 1, "quantizers": [{"name": "q", "kind": "vq", "codebook_size": 4,
                                                                       "dim": 2}]},
           {"t": "step", "step": 0, "q": "q", "perplexity": 1.0, "tokens": 8.0}]
    new = [{"t": "start", "rank": 0, "world_size": 1, "quantizers": [{"name": "q", "kind": "vq", "codebook_size": 4,
                                                                       "dim": 2}]},
           {"t": "step", "step": 0, "q": "q", "perplexity": 3.0, "tokens": 8.0},
           {"t": "run", "step": 0, "loss": float("nan")},
           {"t": "step", "step": 1, "q": "q", "perplexity": 2.0, "tokens": 8.0}]
    _write(run / "rank0.jsonl", old + new, tail='{"t":"step","step":2,"q":"q","perpl')
    meta, streams = load_records(run)
    assert meta == {} and [r["t"] for r in streams[0]] == ["start", "step", "run", "step"]
    df = vqdoctor.load_run(run)
    q = df[df.quantizer == "q"].set_index("step")
    assert list(q["perplexity"]) == [3.0, 2.0]  # only the last session, torn tail skipped
    assert df[df.quantizer == ""]["loss"].isna().all()  # NaN loss read back as NaN


def test_store_keeps_records_in_memory_after_a_write_failure(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    store = RunStore(blocker / "run")
    with pytest.warns(RuntimeWarning, match="cannot write run directory"):
        store.open()
    store.append([{"t": "step", "step": 0, "q": "q"}])
    store.append([{"t": "step", "step": 1, "q": "q"}])
    assert [r["step"] for r in store.memory] == [0, 1]
