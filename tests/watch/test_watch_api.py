"""The Python API on real tiny trainings: records, columns, steps, exact per-step metrics, the step clock."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vqdoctor
from tests.watch.watch_models import (
    BrokenSTQuantizer,
    QuantAE,
    diffusers_vq,
    encodec_rvq,
    lucid_vq,
    make_data,
    train,
    unpack_diffusers,
)
from vqdoctor.live.discovery import LiveSpec

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library


def _lucid():
    return QuantAE(lucid_vq(kmeans_init=True, threshold_ema_dead_code=2, decay=0.8)), ["quantizer"], \
        {"quantizer": lambda out: out[1]}


def _encodec():
    return QuantAE(encodec_rvq(), layout="bdn"), ["quantizer.layers.0", "quantizer.layers.1"], \
        {"quantizer.layers.0": lambda out: out[1], "quantizer.layers.1": lambda out: out[1]}


def _diffusers():
    return QuantAE(diffusers_vq(), layout="bdhw", unpack=unpack_diffusers), ["quantizer"], \
        {"quantizer": lambda out: out[2][2]}


def _perplexity(idx: torch.Tensor, K: int) -> float:
    c = torch.bincount(idx.reshape(-1), minlength=K).double()
    p = c / c.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


@pytest.mark.parametrize("build", [_lucid, _encodec, _diffusers], ids=["lucidrains", "encodec", "diffusers"])
def test_records_and_exact_perplexity(tmp_path, build):
    model, names, getters = build()
    # the test's own hooks see the same indices the watch counts (registered first, so they run first)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for n in names:
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen[n].append(getters[n](out).detach().clone()))
    steps = 45
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        assert [q.name for q in doctor.quantizers] == names
        losses = train(model, make_data(steps), doctor=doctor)

    df = vqdoctor.load_run(tmp_path / "run")
    assert {"rank", "step", "quantizer", "perplexity", "tokens", "usage_window", "dead_fraction",
            "entropy_norm", "z_norm_median", "code_norm_median", "scale_ratio", "loss",
            "grad_norm_encoder", "grad_norm_decoder", "st_grad_ratio", "st_grad_cos"} <= set(df.columns)
    for n in names:
        q = df[df["quantizer"] == n].set_index("step")
        assert list(q.index) == list(range(steps))            # every step, the last partial interval too
        K = 32
        ref = [_perplexity(i, K) for i in seen[n]]
        np.testing.assert_allclose(q["perplexity"].to_numpy(), ref, rtol=1e-9)
        assert (q["tokens"] == 512).all()
        cadence = q["z_norm_median"].dropna().index.tolist()
        assert cadence == list(range(0, steps, 5))
    run = df[df["quantizer"] == ""].set_index("step")
    # every step's loss, across two full flushes and the final partial one, exactly as given
    np.testing.assert_array_equal(run["loss"].to_numpy(), np.asarray(losses, dtype=np.float32))

    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["schema_version"] == 1 and meta["world_size"] == 1
    assert [q["name"] for q in meta["quantizers"]] == names
    assert meta["config"]["flush_every"] == 20 and meta["config"]["window"] >= 100
    recs = [json.loads(line) for line in (tmp_path / "run" / "rank0.jsonl").read_text().splitlines()]
    assert recs[0]["t"] == "start" and recs[-1] == {"t": "end", "step": steps, "status": "finished"}
    hist = [r for r in recs if r["t"] == "hist" and r["q"] == names[0]]
    assert [h["step"] for h in hist] == [19, 39, 44]
    assert sum(sum(h["counts"]) for h in hist) == 512 * steps
    report = vqdoctor.report(tmp_path / "run")
    assert report.source["kind"] == "run" and report.source["steps"] == steps
    assert [q.name for q in report.quantizers] == names
    assert len(report.quantizers[0].histogram) == 16


def test_optimizer_clock_without_doctor_step(tmp_path):
    model, _, _ = _lucid()
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10) as doctor:
        train(model, make_data(25), doctor=doctor, call_step=False)
        assert doctor.current_step == 24  # the 25th step ends lazily (next forward, or exit)
    df = vqdoctor.load_run(tmp_path / "run")
    assert sorted(df[df.quantizer == "quantizer"]["step"]) == list(range(25))


def test_explicit_step_is_the_clock_no_double_count(tmp_path):
    """doctor.step() after optimizer.step(): one step each, not two; gradient accumulation: one step per call."""
    model, _, _ = _lucid()
    data = make_data(20)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=7) as doctor:
        for i in range(0, 20, 2):
            for x in data[i:i + 2]:  # two micro-batches per optimizer step
                y, aux = model(x)
                (torch.nn.functional.mse_loss(y, x) + aux).backward()
            opt.step()
            opt.zero_grad()
            doctor.step()
    df = vqdoctor.load_run(tmp_path / "run")
    q = df[df.quantizer == "quantizer"].set_index("step")
    assert list(q.index) == list(range(10))
    assert (q["tokens"] == 1024).all()


def test_report_alerts_and_flush_callback_mid_run(tmp_path):
    model, _, _ = _lucid()
    flushed: list[int] = []
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10,
                        on_flush=lambda recs: flushed.append(len(recs))) as doctor:
        train(model, make_data(30), doctor=doctor)
        mid = doctor.report()
        assert mid.source["steps"] == 30 and mid.verdict in ("healthy", "warning", "failing")
        df = vqdoctor.load_run(tmp_path / "run")  # readable while the run is open
        assert df["step"].max() == 29
        assert isinstance(doctor.alerts, list)
    assert len(flushed) >= 3 and all(n > 0 for n in flushed)


def test_custom_adapter_fsq_and_lfq(tmp_path):
    from vector_quantize_pytorch import FSQ, LFQ

    remove = vqdoctor.register_adapter(
        BrokenSTQuantizer, lambda m: LiveSpec(kind="vq", codebook_size=m.embedding.num_embeddings,
                                              codebook=lambda: m.embedding.weight, indices=lambda out: out[2]))
    try:
        models = {
            "custom": QuantAE(BrokenSTQuantizer(beta=0.25), name="mine", unpack=lambda o: (o[0], o[1])),
            "fsq": QuantAE(FSQ([4, 4, 3], dim=16), unpack=lambda o: (o[0], o[0].sum() * 0)),
            "lfq": QuantAE(LFQ(dim=16, codebook_size=16), unpack=lambda o: (o[0], o[2])),
        }
        for name, model in models.items():
            with vqdoctor.watch(model, tmp_path / name, flush_every=10) as doctor:
                assert len(doctor.quantizers) == 1
                train(model, make_data(20), doctor=doctor)
            q = vqdoctor.load_run(tmp_path / name)
            q = q[q.quantizer != ""]
            assert q["perplexity"].notna().all() and (q["tokens"] == 512).all()
            if name == "fsq":
                assert q["fsq_level_usage_min"].notna().any()
            if name == "lfq":
                assert q["lfq_bit_balance_min"].notna().any()
            if name == "custom":
                assert q["code_norm_median"].notna().any()
    finally:
        remove()


def test_named_quantizer_missing_is_an_error(tmp_path):
    model, _, _ = _lucid()
    with pytest.raises(vqdoctor.errors.NoQuantizerError, match="nope"):
        vqdoctor.watch(model, tmp_path / "run", quantizers=["nope"]).start()


def test_default_run_dir_is_new_and_not_from_torch_rng(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = torch.get_rng_state()
    a, b = vqdoctor.live.doctor.default_run_dir(), vqdoctor.live.doctor.default_run_dir()
    assert a != b and a.parent.name == "vqdoctor-runs"
    assert torch.equal(state, torch.get_rng_state())


def test_window_metrics_over_a_window(tmp_path):
    """usage_window counts codes hit over the last W steps (here W = 4: exact within a flush)."""
    model, _, _ = _lucid()
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10, window=4) as doctor:
        train(model, make_data(12), doctor=doctor)
    q = vqdoctor.load_run(tmp_path / "run")
    q = q[q.quantizer == "quantizer"].set_index("step")
    assert (q["window_steps"] == 4).all()
    assert q.loc[5, "window_tokens"] == 4 * 512 and q.loc[1, "window_tokens"] == 2 * 512
    assert math.isclose(q.loc[11, "window_tokens"], 2 * 512 + 10 * 512)  # reaches back a whole interval


def test_flush_in_the_middle_of_a_step_keeps_that_step(tmp_path):
    model, _, _ = _lucid()
    data = make_data(6)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=50) as doctor:
        for i, x in enumerate(data):
            y, aux = model(x)
            loss = torch.nn.functional.mse_loss(y, x) + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i == 3:
                doctor.report()  # flushes steps 0-2; step 3 is under way
            doctor.step(loss=loss)
    q = vqdoctor.load_run(tmp_path / "run")
    q = q[q.quantizer == "quantizer"].set_index("step")
    assert list(q.index) == list(range(6)) and (q["tokens"] == 512).all()


@pytest.mark.parametrize("separate", [True, False], ids=["codebook-per-head", "shared-codebook"])
def test_multi_head_counts(tmp_path, separate):
    model = QuantAE(lucid_vq(dim=16, codebook_size=32, heads=2, separate_codebook_per_head=separate,
                             kmeans_init=True, decay=0.8))
    seen: list[torch.Tensor] = []
    model.quantizer.register_forward_hook(lambda m, a, out: seen.append(out[1].detach().clone()))
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10, stats_every=5) as doctor:
        assert doctor.quantizers[0].describe()["heads"] == (2 if separate else 1)
        train(model, make_data(8), doctor=doctor)
    q = vqdoctor.load_run(tmp_path / "run")
    q = q[q.quantizer == "quantizer"].set_index("step")
    idx = seen[5]  # [B, N, heads]
    if separate:  # per-head perplexity, averaged over heads
        ref = sum(_perplexity(idx[..., h], 32) for h in range(2)) / 2
    else:  # one codebook: both heads' indices count together
        ref = _perplexity(idx, 32)
    assert math.isclose(q.loc[5, "perplexity"], ref, rel_tol=1e-9)
    assert q.loc[5, "tokens"] == (512 if separate else 1024)
    assert q["nearest_dist_median"].notna().sum() == 2
