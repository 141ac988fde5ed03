"""VQ001 non-finite: fires on NaN/Inf in EMA buffers, inputs and the loss; silent on finite runs."""

from __future__ import annotations

import math

import torch
from rules_kit import (
    assign,
    check,
    checkpoint,
    ema_step,
    frame,
    gen,
    measured,
    one,
    qev,
    run,
    state,
)

RULE = "non-finite"


def test_fires_on_inf_rows_from_ema_without_laplace_smoothing():
    g = gen(1)
    cb, z = torch.randn(256, 16, generator=g), torch.randn(1024, 16, generator=g)
    unused = int((torch.bincount(assign(z, cb), minlength=256) == 0).sum())
    e, n, m = ema_step(cb, z, eps=0.0)  # zero-init counts, no smoothing: m / 0 for unused codes
    f = one(RULE, checkpoint(measured(state(e, counts=n, sums=m))))
    assert unused > 0
    assert (f.id, f.severity, f.step) == ("non-finite", "error", None)
    assert f.evidence["nonfinite_rows"] == unused
    assert f.evidence["origin"] == "ema"  # an EMA codebook is embed_avg / counts


def test_fp16_smoothing_underflow_names_low_precision_buffers():
    # (0 + 1e-5) / (1000 + K * 1e-5) * 1000 underflows to exactly 0 in float16.
    K, D = 1024, 8
    counts = torch.zeros(K, dtype=torch.float16)
    counts[:500] = 2.0
    sums = torch.randn(K, D, generator=gen(2)).half()
    n = counts.sum()
    smoothed = (counts + 1e-5) / (n + K * 1e-5) * n
    assert float(smoothed[600]) == 0.0
    e = (sums / smoothed[:, None]).float()
    s = state(e, counts=counts.float(), sums=sums.float(),
              dtypes={"cluster_size": "float16", "embed_avg": "float16"})
    f = one(RULE, checkpoint(measured(s)))
    assert f.evidence["nonfinite_rows"] == K - 500
    assert f.evidence["ema_lowp"] == 1.0
    assert "float16" in f.fix


def test_silent_on_smoothed_ema():
    g = gen(3)
    e, n, m = ema_step(torch.randn(256, 16, generator=g), torch.randn(1024, 16, generator=g))
    assert check(RULE, checkpoint(measured(state(e, counts=n, sums=m)))) == []


def test_single_nonfinite_element_fires():
    cb = torch.randn(64, 8, generator=gen(4))
    cb[5, 3] = float("nan")
    f = one(RULE, checkpoint(measured(state(cb, kind="vq"))))
    assert f.evidence["nonfinite_codebook"] == 1
    assert f.evidence["origin"] == "codebook"


def test_run_onset_is_first_tensor_to_go_nonfinite():
    steps = range(0, 100, 5)
    inp = [0] * 6 + [3] * 14        # from step 30
    buf = [0] * 8 + [40] * 12       # from step 40: contaminated by the inputs
    f = one(RULE, run(qev(series=frame(steps, nonfinite_input=inp, nonfinite_buffers=buf))))
    assert f.step == 30
    assert f.evidence["origin"] == "input"
    assert f.evidence["nonfinite_input_first_step"] == 30
    assert f.evidence["nonfinite_buffers_first_step"] == 40


def test_run_loss_nan_tail_is_run_wide():
    loss = [1.0] * 10 + [math.nan] * 3
    f = one(RULE, run(qev(series=frame(nonfinite_input=[0] * 13)), run_series=frame(loss=loss)))
    assert (f.quantizer, f.step, f.confidence) == (None, 10, 0.8)


def test_run_loss_short_nan_gap_is_not_a_finding():
    loss = [1.0] * 10 + [math.nan] * 2  # nan_tail_rows = 3: two unrecorded rows are a gap
    assert check(RULE, run(run_series=frame(loss=loss))) == []
    assert len(check(RULE, run(run_series=frame(loss=loss)), nan_tail_rows=2)) == 1


def test_run_loss_inf_fires_anywhere():
    loss = [1.0, 2.0, math.inf, 1.0]
    assert one(RULE, run(run_series=frame(loss=loss))).step == 2


def test_run_onset_is_the_earlier_of_tensors_and_loss():
    # tensors are scanned every 10 steps, the loss every step
    q = qev(series=frame(range(0, 100, 10), nonfinite_buffers=[0.0] * 6 + [64.0] * 4))
    loss = frame(range(100), loss=[1.0] * 53 + [float("nan")] * 47)
    f = one(RULE, run(q, run_series=loss))
    assert f.step == 53 and f.evidence["nonfinite_buffers_first_step"] == 60
