"""VQ002 loss-divergence: exponential loss growth and gradient spikes; warm-up ramps stay silent."""

from __future__ import annotations

import math

import numpy as np
from rules_kit import check, checkpoint, frame, one, qev, run

RULE = "loss-divergence"


def exploding(n_flat: int = 20, n_grow: int = 30, rate: float = 1.5) -> list[float]:
    return [1.0] * n_flat + [rate ** (i + 1) for i in range(n_grow)]


def test_exponential_loss_is_an_error_with_early_onset():
    f = one(RULE, run(run_series=frame(loss=exploding())))
    assert (f.id, f.severity, f.quantizer) == ("loss-divergence", "error", None)
    # 1.5**6 = 11.4 is the first value >= warn_ratio (10) x the running minimum 1.0: step 25
    assert f.step == 25
    assert f.evidence["loss_ratio_max"] == 1.5 ** 30
    assert f.evidence["loss_min"] == 1.0


def test_growth_still_below_error_ratio_is_a_warning():
    loss = exploding(n_grow=12)  # ends at 1.5**12 = 130x, still doubling per window
    f = one(RULE, run(run_series=frame(loss=loss)))
    assert (f.severity, f.step) == ("warning", 25)


def test_near_threshold_error_ratio():
    loss = exploding(n_grow=17)  # 1.5**17 = 985 < 1e3
    assert one(RULE, run(run_series=frame(loss=loss))).severity == "warning"
    loss = exploding(n_grow=18)  # 1.5**18 = 1478
    assert one(RULE, run(run_series=frame(loss=loss))).severity == "error"


def test_loss_overflowing_to_inf_is_an_error():
    loss = exploding(n_grow=8) + [math.inf, math.nan]
    f = one(RULE, run(run_series=frame(loss=loss)))
    assert f.severity == "error"
    assert f.evidence["loss_nonfinite_step"] == 28


def test_linear_warmup_ramp_is_silent():
    # a loss weight ramped from ~0 over 5000 steps: 5000x its first value, but never exponential
    loss = list(np.linspace(1e-3, 5.0, 5000))
    assert check(RULE, run(run_series=frame(loss=loss))) == []


def test_decreasing_loss_is_silent():
    loss = list(5.0 * np.exp(-np.arange(200) / 50) + 0.1)
    assert check(RULE, run(run_series=frame(loss=loss))) == []


def test_gradient_spike_warning_then_error_from_three():
    g = [1.0] * 60
    g[40] = 500.0
    f = one(RULE, run(run_series=frame(grad_norm_encoder=g)))
    assert (f.severity, f.step) == ("warning", 40)
    assert f.evidence["grad_norm_encoder_spikes"] == 1
    assert f.evidence["grad_norm_encoder_spike_factor_max"] == 500.0
    for i in (45, 50):
        g[i] = 300.0
    assert one(RULE, run(run_series=frame(grad_norm_encoder=g))).severity == "error"


def test_gradient_spike_near_threshold():
    g = [1.0] * 60
    g[40] = 99.0  # grad_spike_factor = 100
    assert check(RULE, run(run_series=frame(grad_norm_decoder=g))) == []


def test_a_loss_jump_that_recovers_is_a_warning():
    # a learning-rate spike: one step blows the loss up 7x, training then recovers most of it
    rng = np.random.default_rng(0)
    loss = list(np.linspace(1.0, 0.5, 70) * (1 + 0.05 * rng.standard_normal(70)))
    loss += [3.5, 1.2, 0.9] + [0.7] * 30
    f = one(RULE, run(run_series=frame(loss=loss)))
    assert (f.severity, f.step) == ("warning", 70)
    assert f.evidence["loss_jump_factor"] > 5 and f.evidence["loss_jump_step"] == 70


def test_noisy_batches_are_not_a_jump():
    # small batches: the loss of single steps 3-4x its recent median stays below jump_factor (5)
    rng = np.random.default_rng(1)
    loss = list(np.exp(rng.normal(0.0, 0.4, 500)))
    assert max(loss[i] / np.median(loss[max(0, i - 10):i]) for i in range(5, 500)) < 5
    assert check(RULE, run(run_series=frame(loss=loss))) == []


def test_an_encoder_output_jump_explains_its_scale_growth():
    # a cosine lookup hides the divergence from the loss; ||z|| jumps 170x between two rows
    z = [0.7, 1.3, 1.8, 2.0, 340.0, 560.0, 600.0, 610.0]
    q = qev(series=frame(range(0, 160, 20), z_norm_median=z), metric="cosine", name="tok")
    f = one(RULE, run(q, run_series=frame(loss=[1.0] * 160)))
    assert (f.severity, f.step, f.evidence["z_jump_quantizer"]) == ("warning", 80, "tok")
    assert f.evidence["explains"] == ["scale-mismatch", "no-encoder-gradient"]
    steady = qev(series=frame(range(0, 160, 20), z_norm_median=[0.7 * 1.9 ** i for i in range(8)]))
    assert check(RULE, run(steady, run_series=frame(loss=[1.0] * 160))) == []


def test_checkpoint_is_silent():
    assert check(RULE, checkpoint(qev({"perplexity": 1.0}))) == []


def test_checkpoints_with_weights_that_blew_up():
    def ev(enc: float, dec: float):
        e = checkpoint()
        e.run.update(encoder_norm_growth=enc, decoder_norm_growth=dec)
        return e

    f = one(RULE, ev(2.0, 12.8))
    assert (f.severity, f.quantizer, f.evidence) == ("warning", None, {"decoder_norm_growth": 12.8})
    assert check(RULE, ev(2.8, 1.7)) == []  # a scale mismatch's encoder growth stays below 5x
    assert check(RULE, ev(2.8, 1.7), weight_growth_warn=2.5)
