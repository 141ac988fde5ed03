"""VQ003 scale-mismatch: probe and run ratios of input to code norms, with usage/geometry confirmation."""

from __future__ import annotations

import numpy as np
import torch
from rules_kit import check, checkpoint, frame, gen, measured, one, qev, run, state

RULE = "scale-mismatch"
K, D = 512, 64


def probe_case(codebook: torch.Tensor, z: torch.Tensor, **kw):
    return checkpoint(measured(state(codebook, kind="vq", **kw), probe=z))


def test_taming_uniform_init_against_unit_scale_inputs_is_an_error():
    g = gen(0)
    cb = (torch.rand(K, D, generator=g) * 2 - 1) / K  # taming/diffusers init uniform(+-1/K)
    z = torch.randn(4096, D, generator=g)
    ratio = float(z.norm(dim=1).median() / cb.norm(dim=1).median())
    f = one(RULE, probe_case(cb, z))
    assert (f.id, f.severity) == ("scale-mismatch", "error")
    assert np.isclose(f.evidence["scale_ratio"], ratio, rtol=1e-4)
    assert ratio > 100
    # inputs far outside the codebook's cloud, though argmax-like lookups still spread them
    assert f.evidence["nearest_to_intercode"] > 3
    assert f.confidence == 0.7
    assert "k-means" in f.fix


def test_tiny_encoder_outputs_collapse_to_the_innermost_code():
    g = gen(1)
    cb = torch.randn(K, D, generator=g)
    z = 0.005 * torch.randn(4096, D, generator=g)
    f = one(RULE, probe_case(cb, z))
    assert f.severity == "error"
    assert f.evidence["scale_ratio"] < 0.006
    assert f.evidence["usage_effective"] < 0.1
    assert f.confidence == 0.9


def test_codebook_from_data_is_silent():
    g = gen(2)
    z = torch.randn(4096, D, generator=g)
    assert check(RULE, probe_case(z[:K].clone(), z)) == []


def test_near_warn_ratio():
    g = gen(3)
    cb = torch.randn(K, D, generator=g)
    base = torch.randn(4096, D, generator=g)
    below = check(RULE, probe_case(cb, 9.0 * base))
    above = one(RULE, probe_case(cb, 11.0 * base))
    assert below == []
    assert above.severity == "warning"
    assert 10 <= above.evidence["scale_ratio"] < 100


def test_far_ratio_with_healthy_usage_and_geometry_is_silent():
    q = qev({"scale_ratio": 50.0, "probe_perplexity": 400.0, "probe_tokens": 4096.0,
             "nearest_to_intercode": 1.0}, kind="vq", K=K)
    assert check(RULE, checkpoint(q)) == []


def test_checkpoint_without_probe_is_silent():
    cb = (torch.rand(K, D, generator=gen(4)) * 2 - 1) / K
    assert check(RULE, checkpoint(measured(state(cb, kind="vq")))) == []


def test_cosine_lookup_ignores_static_ratio():
    q = qev({"scale_ratio": 900.0, "nearest_to_intercode": 50.0, "probe_perplexity": 1.0,
             "probe_tokens": 4096.0}, kind="vq", K=K, metric="cosine")
    assert check(RULE, checkpoint(q)) == []


def test_run_drift_apart_onset_and_severity():
    steps = range(0, 1000, 10)
    ratio = [1.0] * 50 + [50.0] * 50
    perp = [300.0] * 50 + [3.0] * 50
    q = qev(series=frame(steps, scale_ratio=ratio, perplexity=perp, tokens=[1024] * 100), K=K)
    f = one(RULE, run(q))
    assert (f.step, f.severity) == (500, "warning")
    assert f.evidence["scale_ratio"] == 50.0
    assert f.evidence["usage_effective"] == 3.0 / K


def test_run_transient_at_init_that_recovers_is_silent():
    ratio = [200.0] * 10 + [1.0] * 40
    q = qev(series=frame(scale_ratio=ratio, perplexity=[2.0] * 10 + [300.0] * 40), K=K)
    assert check(RULE, run(q)) == []


def test_run_ratio_from_medians_when_scale_ratio_not_recorded():
    q = qev(series=frame(z_norm_median=[8.0] * 10, code_norm_median=[0.008] * 10,
                         nearest_to_intercode=[700.0] * 10), K=K)
    f = one(RULE, run(q))
    assert (f.step, f.severity) == (0, "error")
    assert np.isclose(f.evidence["scale_ratio"], 1000.0)


def test_run_cosine_input_norm_growth_lucidrains_26():
    z = list(np.geomspace(22.0, 20000.0, 100))  # input norm 22 -> 20000
    f = one(RULE, run(qev(series=frame(z_norm_median=z), metric="cosine")))
    assert f.severity == "error"
    first = int(np.argmax(np.asarray(z) / 22.0 >= 10.0))
    # dated where the growth began; the step that crossed 10x is in the evidence
    assert f.step == 0 and f.evidence["z_growth_warn_step"] == first
    assert np.isclose(f.evidence["z_growth"], 20000.0 / 22.0)


def test_run_drift_that_healed_but_left_dead_codes_is_reported_at_its_onset():
    # the user story's exact settings (docs/contract.md#the-user-story): the encoder outgrows the
    # k-means codebook for a few hundred steps (ratio 1 -> 19 -> 150 -> 1.7), and the codes it
    # skipped meanwhile stay dead
    steps = list(range(0, 600, 10))
    ratio = [1.0] * 3 + [19.0] * 5 + [150.0] * 30 + [1.7] * 22
    perp = [200.0] * 3 + [5.0] * 35 + [20.0] * 22
    dead = [0.0] * 3 + [0.5] * 35 + [0.9] * 22
    q = qev(series=frame(steps, scale_ratio=ratio, perplexity=perp, tokens=[512.0] * 60, dead_fraction=dead), K=K)
    f = one(RULE, run(q))
    assert (f.severity, f.step, f.confidence) == ("error", 30, 0.9)
    assert f.evidence["scale_ratio_worst"] == 150.0 and f.evidence["mismatch_ended_step"] == 380
    assert f.evidence["dead_fraction_end"] == 0.9 and f.evidence["scale_ratio"] == 1.7
    assert "dead" in f.message


def test_run_drift_that_healed_without_damage_is_a_note():
    steps = list(range(0, 600, 10))
    ratio = [1.0] * 3 + [150.0] * 30 + [1.0] * 27
    perp = [200.0] * 3 + [5.0] * 30 + [250.0] * 27
    q = qev(series=frame(steps, scale_ratio=ratio, perplexity=perp, tokens=[512.0] * 60,
                         dead_fraction=[0.0] * 60), K=K)
    f = one(RULE, run(q))
    assert (f.severity, f.step) == ("info", 30)


def test_checkpoint_ratio_needs_no_frame():
    # the probe path judges plain floats (no pandas frame is built for one row)
    q = qev({"scale_ratio": 250.0, "probe_perplexity": 2.0, "probe_tokens": 4096.0}, kind="vq", K=K)
    f = one(RULE, checkpoint(q))
    assert (f.severity, f.confidence, f.step) == ("error", 0.9, None)


def test_two_checkpoints_codes_in_use_moved_far_from_the_rest():
    def ck(moved: float, still: float, metric: str = "euclidean"):
        return checkpoint(qev({"moved_rows_norm_ratio": moved, "rows_unchanged_fraction": still}, kind="vq",
                              metric=metric))

    f = one(RULE, ck(204.0, 0.995))
    assert f.severity == "warning" and f.evidence["moved_rows_norm_ratio"] == 204.0
    assert check(RULE, ck(1.06, 0.42)) == []  # plain dead codes: used and unused codes alike
    assert check(RULE, ck(33.0, 0.004)) == []  # almost every code moved: nothing stranded
    assert check(RULE, ck(204.0, 0.995, "cosine")) == []
    assert one(RULE, ck(0.05, 0.9)).severity == "warning"  # codes shrank towards tiny inputs
