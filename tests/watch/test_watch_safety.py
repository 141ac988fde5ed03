"""Never break training: identical results, hooks removed, failures contained, crash-safe store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import vqdoctor
from tests.watch.watch_models import (
    BrokenSTQuantizer,
    QuantAE,
    encodec_rvq,
    lucid_vq,
    make_data,
    train,
)
from vqdoctor.live.discovery import LiveSpec
from vqdoctor.live.doctor import WatchWarning

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

ROOT = Path(__file__).resolve().parents[2]


def _hook_counts(model: nn.Module) -> dict[str, int]:
    import torch.nn.modules.module as M
    import torch.optim.optimizer as O

    out = {"module": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                         + len(m._backward_pre_hooks) for m in model.modules())}
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        out[name] = len(getattr(M, name))
    out["opt_pre"], out["opt_post"] = len(O._global_optimizer_pre_hooks), len(O._global_optimizer_post_hooks)
    return out


def _lucid_dropout_model(**kw) -> nn.Module:
    return QuantAE(lucid_vq(kmeans_init=True, threshold_ema_dead_code=2, decay=0.8), dropout=0.2, **kw)


def _run(build, watch_dir: Path | None, steps: int = 40) -> tuple[nn.Module, torch.Tensor]:
    """Seeded training with an eval pass (eval mode) and a train-mode no_grad pass in the middle."""
    torch.manual_seed(123)
    model = build()
    data = make_data(steps)

    def interlude(i: int) -> None:
        if i == 17:
            model.eval()
            with torch.no_grad():
                model(data[0])
            model.train()
            with torch.no_grad():
                model(data[1])  # train-mode VQ under no_grad: mutates EMA buffers (same in both runs)

    if watch_dir is None:
        train(model, data, hook=interlude)
    else:
        with vqdoctor.watch(model, watch_dir, flush_every=7, stats_every=3) as doctor:
            train(model, data, doctor=doctor, hook=interlude)
    return model, torch.get_rng_state()


@pytest.mark.parametrize("build", [
    _lucid_dropout_model,
    lambda: QuantAE(encodec_rvq(threshold_ema_dead_code=2), layout="bdn", dropout=0.2),
    lambda: QuantAE(lucid_vq(kmeans_init=True, threshold_ema_dead_code=2), inplace=True),
], ids=["lucidrains-kmeans-replacement-dropout", "encodec-replacement-dropout", "relu-inplace"])
def test_bitwise_identical_to_unwatched(tmp_path, build):
    a, rng_a = _run(build, None)
    b, rng_b = _run(build, tmp_path / "run")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), name
    assert torch.equal(rng_a, rng_b)  # the watch consumed no random numbers
    assert b.training
    df = vqdoctor.load_run(tmp_path / "run")
    assert df[df.quantizer != ""]["perplexity"].notna().any()


def test_hooks_removed_on_exit_and_when_training_raises(tmp_path):
    model = _lucid_dropout_model()
    before = _hook_counts(model)
    with vqdoctor.watch(model, tmp_path / "ok", flush_every=5, stats_every=2) as doctor:
        assert _hook_counts(model) != before
        train(model, make_data(6), doctor=doctor)
    assert _hook_counts(model) == before

    model.eval()
    data = make_data(12)
    with pytest.raises(RuntimeError, match="boom"):
        with vqdoctor.watch(model, tmp_path / "raised", flush_every=5, stats_every=2) as doctor:
            model.train()

            def boom(i: int) -> None:
                if i == 8:
                    raise RuntimeError("boom")

            train(model, data, doctor=doctor, hook=boom)
    assert _hook_counts(model) == before
    meta = json.loads((tmp_path / "raised" / "meta.json").read_text())
    assert meta["status"] == "failed"
    df = vqdoctor.load_run(tmp_path / "raised")
    assert sorted(set(df["step"])) == list(range(8))  # everything up to the failure was kept


def test_mode_untouched(tmp_path):
    model = _lucid_dropout_model()
    model.eval()
    model.quantizer.train()
    modes = [m.training for m in model.modules()]
    with vqdoctor.watch(model, tmp_path / "run"):
        with torch.no_grad():
            model(make_data(1)[0])
    assert [m.training for m in model.modules()] == modes


def test_probe_that_raises_is_disabled_once_and_training_completes(tmp_path):
    calls = {"n": 0}

    def bad_indices(out):
        calls["n"] += 1
        raise ValueError("adapter bug")

    remove = vqdoctor.register_adapter(
        BrokenSTQuantizer, lambda m: LiveSpec(kind="vq", codebook_size=32, codebook=lambda: m.embedding.weight,
                                              indices=bad_indices))
    try:
        model = QuantAE(BrokenSTQuantizer(beta=0.25), name="mine", unpack=lambda o: (o[0], o[1]))
        with pytest.warns(WatchWarning, match="adapter bug"):
            with vqdoctor.watch(model, tmp_path / "run", flush_every=10, stats_every=5) as doctor:
                losses = train(model, make_data(30), doctor=doctor)
    finally:
        remove()
    assert len(losses) == 30 and calls["n"] == 1  # disabled after the first failure
    recs = [json.loads(x) for x in (tmp_path / "run" / "rank0.jsonl").read_text().splitlines()]
    events = [r for r in recs if r["t"] == "event"]
    assert len(events) == 1 and "count" in events[0]["message"] and events[0]["q"] == "mine"
    df = vqdoctor.load_run(tmp_path / "run")
    assert df["z_norm_median"].notna().sum() == 6  # the other probes kept working
    assert any(e["where"] == "watch" for e in vqdoctor.report(tmp_path / "run").errors)


def test_unwritable_run_dir_warns_and_training_completes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = _lucid_dropout_model()
    with pytest.warns(WatchWarning, match="cannot write run directory"):
        with vqdoctor.watch(model, blocker / "run", flush_every=5) as doctor:
            losses = train(model, make_data(12), doctor=doctor)
            report = doctor.report()  # from the records kept in memory
    assert len(losses) == 12
    assert report.source["steps"] == 12


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_warns_and_training_completes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "rank0.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    model = _lucid_dropout_model()
    with pytest.warns(WatchWarning, match="cannot write run directory"):
        with vqdoctor.watch(model, run, flush_every=5) as doctor:
            losses = train(model, make_data(12), doctor=doctor)
    assert len(losses) == 12
    assert doctor.report().source["steps"] == 12


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    import vqdoctor
    from tests.watch.watch_models import QuantAE, lucid_vq, make_data, train
    torch.set_num_threads(1)
    model = QuantAE(lucid_vq(kmeans_init=True, threshold_ema_dead_code=2, decay=0.8))
    data = make_data(20)
    def flushed(records):
        print("flushed", max(r.get("step", -1) for r in records), flush=True)
    with vqdoctor.watch(model, {run!r}, flush_every=10, stats_every=5, on_flush=flushed) as doctor:
        for i in range(100000):
            train(model, [data[i % 20]], doctor=doctor)
""")


def test_sigkill_mid_run_loses_at_most_the_last_interval(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), run=str(run)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=ROOT)
    last = -1
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line.split()[1])
            if last >= 39:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last >= 39, "the training subprocess never flushed"
    with open(run / "rank0.jsonl", "a") as f:
        f.write('{"t":"step","step":9999,"q":"quan')  # a torn last record
    df = vqdoctor.load_run(run)
    steps = sorted(set(df["step"]))
    assert steps == list(range(len(steps))) and len(steps) >= last + 1
    assert 9999 not in steps
    report = vqdoctor.report(run)
    assert report.source["status"] == "running" and report.quantizers[0].name == "quantizer"
