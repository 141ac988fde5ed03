"""The measurement core: one definition of every usage metric, whichever path the counts take.

The same code counts go through a checkpoint (EMA counts of a stored quantizer), a recorded run
(indices a live quantizer returned, watched and flushed) and the gate's window over that run, and
give the same numbers; the device twins agree with the host functions; the store's tail reader
reads only what was appended and keeps a bounded history when asked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import vqdoctor
from vqdoctor.gate import GateThresholds, gate
from vqdoctor.live.store import StoreTail
from vqdoctor.metrics import device as MD
from vqdoctor.metrics import functional as F
from vqdoctor.metrics import usage as U
from vqdoctor.metrics.codebook import codebook_metrics
from vqdoctor.metrics.probe import input_spread
from vqdoctor.quantizers.base import QuantizerState

K, D, STEPS = 64, 8, 12


def per_step_counts() -> np.ndarray:
    """Uneven integer usage of K codes per step: 8 never used, one code takes a large share."""
    g = np.random.default_rng(3)
    c = g.integers(1, 12, size=K).astype(np.float64)
    c[:8] = 0
    c[8] = 120
    return c


class FixedIndices(nn.Module):
    """A quantizer that assigns its inputs to a fixed multiset of codes (known counts per step)."""

    def __init__(self, counts: np.ndarray):
        super().__init__()
        self.table = nn.Parameter(torch.randn(K, D))
        self.idx = torch.from_numpy(np.repeat(np.arange(K), counts.astype(int)))

    def forward(self, z: torch.Tensor):
        q = z + (self.table[self.idx[: z.shape[0]]] - z).detach()
        return q, self.idx[: z.shape[0]]


def test_the_same_counts_give_the_same_numbers_on_every_path(tmp_path) -> None:
    counts = per_step_counts()
    n = int(counts.sum())
    # 1. checkpoint: a generic EMA quantizer whose cluster_size holds the counts
    embed = torch.randn(K, D)
    c = torch.from_numpy(counts).float()
    torch.save({"vq.embed": embed, "vq.cluster_size": c, "vq.embed_avg": embed * c[:, None]}, tmp_path / "q.pt")
    ckpt = vqdoctor.inspect(tmp_path / "q.pt")
    cm = ckpt.quantizers[0].metrics
    # 2. recorded run: the live quantizer returns exactly those indices every step
    quant = FixedIndices(counts)
    model = nn.Sequential(nn.Linear(D, D), quant)
    remove = vqdoctor.register_adapter(FixedIndices, lambda m: vqdoctor.LiveSpec(
        kind="vq", codebook_size=K, codebook=lambda: m.table))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    try:
        with vqdoctor.watch(model, tmp_path / "run", flush_every=4, stats_every=4, window=STEPS) as doctor:
            for _ in range(STEPS):
                q, _ = model(torch.randn(n, D))
                loss = q.pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                doctor.step(loss=loss)
    finally:
        remove()
    run = vqdoctor.report(tmp_path / "run")
    rm = run.quantizers[0].metrics
    # 3. the gate's window over that run
    result = gate(tmp_path / "run", GateThresholds(window=STEPS, min_usage=0.25, max_dead_fraction=0.5))
    values = {c.name: c.value for c in result.checks if c.quantizer is not None}

    expected = {k: float(v) for k, v in U.usage_metrics(counts[None]).items()}
    assert 0.1 < expected["dead_fraction"] < 0.2 and expected["top1_share"] > 0.1
    for a, b in (("perplexity", "perplexity_window"), ("dead_fraction", "dead_fraction"),
                 ("usage_fraction", "usage_window"), ("entropy_norm", "entropy_norm_window")):
        assert cm[a] == pytest.approx(expected[a], rel=1e-6), a
        assert rm[b] == pytest.approx(expected[a], rel=1e-6), b
    assert cm["top1_share"] == pytest.approx(expected["top1_share"], rel=1e-6)
    assert values["min_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert values["min_usage"] == pytest.approx(expected["usage_fraction"], rel=1e-6)
    assert values["max_dead_fraction"] == pytest.approx(expected["dead_fraction"], rel=1e-6)
    assert ckpt.quantizers[0].histogram == pytest.approx(run.quantizers[0].histogram)
    assert ckpt.quantizers[0].histogram == pytest.approx(U.usage_histogram(counts))
    # every step record carries the per-step numbers of the same counts
    recs = [json.loads(line) for line in (tmp_path / "run" / "rank0.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["t"] == "step" and "perplexity" in r]
    assert len(steps) == STEPS
    assert all(r["perplexity"] == pytest.approx(expected["perplexity"]) for r in steps)
    hist = [r for r in recs if r["t"] == "hist"]
    assert np.sum([r["counts"] for r in hist], axis=0).tolist() == (counts * STEPS).astype(int).tolist()


def test_usage_window_update_merge_compute() -> None:
    g = np.random.default_rng(0)
    a, b = g.poisson(3.0, size=(2, K)).astype(float), g.poisson(3.0, size=(2, K)).astype(float)
    w = U.UsageWindow().update(a, steps=5, first_step=0, last_step=4)
    merged = w.merge(U.UsageWindow().update(b, steps=5, first_step=5, last_step=9))
    assert merged.steps == 10 and (merged.first_step, merged.last_step) == (0, 9)
    assert merged.compute()["perplexity_window"] == pytest.approx(
        float(U.window_metrics(a + b)["perplexity_window"]))
    ranks = U.merge_ranks([U.UsageWindow().update(a, steps=5), U.UsageWindow().update(b, steps=5)])
    assert ranks.steps == 5 and np.array_equal(ranks.counts, a + b)
    assert w.counts is not None and np.array_equal(w.counts, a)  # merge does not change its inputs
    assert U.UsageWindow().update(a).update(np.ones((3, K)))._shape_mismatch == 1


def test_all_zero_counts_know_no_usage() -> None:
    m = U.usage_metrics(np.zeros((1, K)))
    assert np.isnan(m["dead_fraction"]) and np.isnan(m["perplexity"])
    assert np.isnan(U.dead_fraction(np.zeros(K)))
    assert U.usage_histogram(np.zeros(K)) == []


def test_reachable_codes_and_auto_window() -> None:
    assert U.reachable_codes(1024, None) == 1024
    assert U.reachable_codes(1024, 100) == pytest.approx(95.3, abs=0.1)
    assert U.auto_window(512, 64) == 100 and U.auto_window(65536, 64) == 4096
    assert U.auto_window(10 ** 7, 1) == U.WINDOW_MAX


def test_device_twins_match_the_host_functions() -> None:
    g = torch.Generator().manual_seed(1)
    cb = torch.randn(1, K, D, generator=g) * torch.rand(1, K, 1, generator=g)
    counts = torch.from_numpy(per_step_counts()).float()[None]
    host = codebook_metrics(QuantizerState("q", "vq-ema", "generic", K, D, codebook=cb.clone(),
                                           cluster_size=counts.clone()))
    assert float(MD.code_norm_median(cb, counts)) == pytest.approx(host["code_norm_median"], rel=1e-6)
    v, w = torch.rand(100, generator=g), torch.rand(100, generator=g)
    assert float(MD.weighted_median(v, w)) == pytest.approx(F.weighted_median(v, w), rel=1e-6)
    z = torch.randn(500, D, generator=g) * 3 + 1
    for cosine in (False, True):
        assert float(MD.input_spread(z, cosine)) == pytest.approx(input_spread(z, cosine), rel=1e-5)


def test_store_tail_reads_only_what_was_appended_and_keeps_a_bounded_history(tmp_path) -> None:
    path = tmp_path / "rank0.jsonl"
    (tmp_path / "meta.json").write_text('{"schema_version": 1}')
    with path.open("w") as f:
        f.write(json.dumps({"t": "start", "step": 0}) + "\n")
    tail = StoreTail(tmp_path, keep_steps=50)
    assert [r["t"] for _, r in tail.poll()] == ["start"]
    for block in range(10):
        with path.open("a") as f:
            for s in range(block * 100, block * 100 + 100):
                f.write(json.dumps({"t": "step", "step": s, "q": "vq"}) + "\n")
            f.write('{"t": "step", "st')  # a torn line: read once it is complete
        new = tail.poll()
        assert len(new) == 100  # the torn line waits; completed as garbage, it is skipped
        with path.open("r+") as f:  # finish the torn line as garbage, as a killed writer leaves it
            f.seek(0, 2)
            f.write('ep": }\n')
    kept = tail.streams[0]
    assert kept[0]["t"] == "start" and tail.trimmed
    assert len(kept) <= 52 and kept[-1]["step"] == 999
    full = StoreTail(tmp_path)
    full.poll(final=True)
    assert len(full.streams[0]) == 1 + 1000 and not full.trimmed
