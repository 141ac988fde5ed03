"""Recorder signals behind the run-mode rules: straight-through comparability, detached inputs,
missing gradients, one-hot assignments, blow-ups, per-forward replacements, eval moves, and the
evidence's short-window mask."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqdoctor
from tests.libs import LUCIDRAINS_ZERO_INIT
from tests.watch.watch_models import QuantAE, SyncFreeEMAQuantizer, lucid_vq, make_data, train
from vqdoctor.live.store import load_records, records_frame
from vqdoctor.metrics import device

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

STEPS = 40


def _frame(run) -> pd.DataFrame:
    _, streams = load_records(run)
    return records_frame(streams)


def _col(df, name: str, q: str | None = None) -> np.ndarray:
    rows = df if q is None else df[df["quantizer"] == q]
    if name not in rows.columns:
        return np.array([])
    v = rows[name].to_numpy(dtype=float)
    return v[~np.isnan(v)]


def test_straight_through_compared_only_in_code_space(tmp_path):
    plain = QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, decay=0.8))
    projected = QuantAE(lucid_vq(dim=16, codebook_dim=4, codebook_size=32, kmeans_init=True, decay=0.8))
    for name, model in (("plain", plain), ("projected", projected)):
        with vqdoctor.watch(model, tmp_path / name, flush_every=20, stats_every=5) as doctor:
            train(model, make_data(STEPS), doctor=doctor)
    df_plain, df_proj = _frame(tmp_path / "plain"), _frame(tmp_path / "projected")
    assert set(_col(df_plain, "st_code_space")) == {1.0}
    # intact straight-through in the code space: the output gradient comes out at the input
    assert np.median(_col(df_plain, "st_grad_passthrough")) > 0.5
    assert np.median(_col(df_plain, "st_grad_cos")) > 0.5
    # project_in / project_out inside the module: not comparable, and never a finding for it
    assert set(_col(df_proj, "st_code_space")) == {0.0}
    assert all(f.id != "no-encoder-gradient" for f in vqdoctor.report(tmp_path / "projected").findings)


class _Detached(nn.Module):
    """vq(z.detach()): the encoder never gets a gradient (its .grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
        self.quantizer = lucid_vq(codebook_size=32, kmeans_init=True, decay=0.8)
        self.decoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, _, commit = self.quantizer(self.encoder(x).detach())
        return self.decoder(q), commit.sum()


def test_detached_encoder_output_reads_zero_and_is_named(tmp_path):
    model = _Detached()
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        train(model, make_data(STEPS), doctor=doctor)
    df = _frame(tmp_path / "run")
    assert set(_col(df, "st_grad_ratio", "quantizer")) == {0.0}
    assert set(_col(df, "st_input_no_grad", "quantizer")) == {1.0}
    # encoder parameters held by the optimizer but never given a gradient: 0, not "unmeasured"
    assert set(_col(df, "grad_norm_encoder")) == {0.0}
    assert _col(df, "grad_norm_decoder").min() > 0
    f = vqdoctor.report(tmp_path / "run").findings[0]
    assert (f.id, f.severity, f.step) == ("no-encoder-gradient", "error", 0)
    assert "detach" in f.message


def test_first_forward_in_eval_mode_keeps_the_encoder_decoder_split(tmp_path):
    model = QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, decay=0.8))
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        model.eval()
        with torch.no_grad():
            model(make_data(1, seed=3)[0])  # an evaluation pass before training
        model.train()
        train(model, make_data(STEPS), doctor=doctor)
    df = _frame(tmp_path / "run")
    assert len(_col(df, "grad_norm_encoder")) and len(_col(df, "grad_norm_decoder"))


class _OneHotEMA(nn.Module):
    """zalando-style output (loss, quantized, perplexity, one-hot encodings [N, K]); no integer indices."""

    def __init__(self, K: int = 32, D: int = 16):
        super().__init__()
        self.inner = SyncFreeEMAQuantizer(dim=D, codebook_size=K)
        self.K = K

    def forward(self, z: torch.Tensor):
        q, loss, idx = self.inner(z)
        enc = F.one_hot(idx.reshape(-1), self.K).float()
        return loss, q, torch.ones(()), enc


def test_one_hot_assignments_are_counted(tmp_path):
    model = QuantAE(_OneHotEMA(), unpack=lambda o: (o[1], o[0]))
    counts: list[torch.Tensor] = []
    model.quantizer.register_forward_hook(lambda m, a, out: counts.append(out[3].sum(0)))
    with vqdoctor.watch(model, tmp_path / "run", quantizers=["quantizer.inner"], flush_every=20,
                        stats_every=5) as doctor:
        train(model, make_data(STEPS), doctor=doctor)
    _, streams = load_records(tmp_path / "run")
    errors = [r for r in streams[0] if r.get("t") == "event"]
    assert not errors, errors
    hist = sum(np.asarray(r["counts"]) for r in streams[0] if r.get("t") == "hist")
    assert np.array_equal(hist, torch.stack(counts).sum(0).numpy())


def test_blowup_measure_guards_a_reference_at_zero():
    nan = torch.full((), float("nan"))
    norms = torch.tensor([[1.0, 1.1, 0.9, 1e5, 2e5]])
    top, rows = device.blowup(norms, torch.tensor(1.0), torch.tensor(1.2), nan)
    assert (float(top), float(rows)) == (2e5, 2.0)
    # the only live code sits at the origin (an encoder output of exactly 0): no reference
    top, rows = device.blowup(norms, torch.tensor(1e-10), torch.tensor(0.0), nan)
    assert math.isnan(float(top)) and math.isnan(float(rows))
    # codes that followed a growing encoder to ||z|| ~ 170 while the weighted median stayed at
    # the initial scale are not blown up: the inputs are the reference
    followed = torch.tensor([[1.1] * 6 + [150.0, 290.0]])
    top, rows = device.blowup(followed, torch.tensor(1.1), torch.tensor(170.0), nan)
    assert (float(top), float(rows)) == (290.0, 0.0)


def test_zero_initialised_counts_blow_up_in_a_run(tmp_path):
    q = SyncFreeEMAQuantizer(codebook_size=64, decay=0.99)
    with torch.no_grad():
        q.cluster_size.zero_()  # the bug: zero counts, sums at the codebook, no debiasing
    model = QuantAE(q, unpack=lambda o: (o[0], o[1]))
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        train(model, make_data(STEPS), doctor=doctor)
    df = _frame(tmp_path / "run")
    assert _col(df, "blowup_ratio").max() > 1e3 and _col(df, "blowup_rows").max() > 0
    assert _col(df, "ema_count_sum_to_tokens")[0] < 0.05
    f = vqdoctor.report(tmp_path / "run").findings[0]
    assert (f.id, f.severity, f.step) == ("ema-divergence", "error", 0)
    assert f.evidence["sub_causes"][0] == "blowup"


def test_replacements_counted_per_forward(tmp_path):
    # ~1 hit per code per step (512 tokens, 512 codes) and a threshold near the mean count: codes
    # are reset every step. <= 1.32: absolute threshold 2; >= 1.34: half the mean count.
    kw = {"dead_code_threshold_ratio": 0.5} if LUCIDRAINS_ZERO_INIT else {"threshold_ema_dead_code": 2}
    model = QuantAE(lucid_vq(codebook_size=512, kmeans_init=False, decay=0.8, **kw))
    vq = model.quantizer
    resets: dict[int, int] = {}
    step = {"i": 0}
    replace = vq._codebook.replace

    def observed(samples, batch_mask, seq_mask=None):
        # the library's own call with the codes it expired in this forward (at most one per sample)
        resets[step["i"]] = min(int(batch_mask.sum()), samples.shape[-2])
        return replace(samples, batch_mask=batch_mask, seq_mask=seq_mask)

    def after(m, a, out):
        step["i"] += 1

    vq._codebook.replace = observed
    vq.register_forward_hook(after)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        train(model, make_data(STEPS), doctor=doctor)
    df = _frame(tmp_path / "run")
    rows = df[df["quantizer"] == "quantizer"].dropna(subset=["codes_replaced"])
    assert 0 not in set(rows["step"])  # the first forward also runs the lazy init: not counted
    for s, v in zip(rows["step"], rows["codes_replaced"], strict=True):
        assert abs(v - resets.get(int(s), 0)) <= 0.1 * resets.get(int(s), 0), (s, v, resets.get(int(s)))
    assert rows["codes_replaced"].mean() > 50

def test_eval_passes_moving_the_codebook_like_training_are_a_warning(tmp_path):
    model = QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=0, decay=0.8))
    held_out = make_data(2, seed=1)  # the training distribution

    def evaluate(i: int) -> None:
        if i % 10 == 5:
            with torch.no_grad():
                for x in held_out:
                    model(x)

    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        train(model, make_data(STEPS), doctor=doctor, hook=evaluate)
    df = _frame(tmp_path / "run")
    assert len(_col(df, "eval_codebook_rms_change")) and len(_col(df, "codebook_forward_rms_change"))
    f = next(f for f in vqdoctor.report(tmp_path / "run").findings if f.id == "ema-divergence")
    # evaluation data of the training distribution moves the table about as a training batch
    assert f.severity == "warning" and 0.5 <= f.evidence["eval_move_to_train_move"] < 3


def test_short_windows_do_not_count_as_dead(tmp_path):
    # 512 codes, 512 tokens per step: one step hits ~63% of a uniform codebook
    model = QuantAE(lucid_vq(codebook_size=512, kmeans_init=True, threshold_ema_dead_code=0, decay=0.8))
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20, stats_every=5) as doctor:
        train(model, make_data(8), doctor=doctor)
    q = vqdoctor.report(tmp_path / "run")
    from vqdoctor.sources.run import evidence_from_records

    ev, *_ = evidence_from_records(*load_records(tmp_path / "run"))
    s = ev.quantizers[0].series
    short = s["window_tokens"] < 4 * 512
    assert short.any() and s.loc[short, "dead_fraction"].isna().all()
    assert all(f.id != "dead-codes" or f.step is None or f.step >= 3 for f in q.findings)
