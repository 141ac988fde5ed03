"""VQ007 no-encoder-gradient: straight-through ratio from real autograd, cosine, run-wide norms."""

from __future__ import annotations

import numpy as np
import torch
from rules_kit import check, checkpoint, frame, gen, one, qev, run

RULE = "no-encoder-gradient"


def st_grad_ratio(straight_through: bool, seed: int = 0) -> float:
    """|grad at quantizer input| / |grad at its output| for one real backward pass."""
    g = gen(seed)
    cb = torch.randn(32, 8, generator=g).requires_grad_()  # a gradient-trained codebook
    z = torch.randn(64, 8, generator=g, requires_grad=True)
    q = cb[torch.cdist(z, cb).argmin(1)]
    out = z + (q - z).detach() if straight_through else q  # the bug: returning the code itself
    out.retain_grad()
    target = torch.randn(64, 8, generator=g)
    ((out - target) ** 2).sum().backward()
    grad_in = z.grad if z.grad is not None else torch.zeros_like(z)
    return float(grad_in.norm() / out.grad.norm())


def test_broken_straight_through_is_an_error_at_its_onset():
    ok, broken = st_grad_ratio(True), st_grad_ratio(False)
    assert ok == 1.0 and broken == 0.0
    ratio = [ok] * 20 + [broken] * 10  # a refactor broke the estimator at step 200
    f = one(RULE, run(qev(series=frame(range(0, 300, 10), st_grad_ratio=ratio))))
    assert (f.id, f.severity, f.step) == ("no-encoder-gradient", "error", 200)
    assert f.evidence["st_grad_ratio"] == 0.0
    assert "(q - z).detach()" in f.fix


def test_healthy_straight_through_is_silent():
    q = qev(series=frame(st_grad_ratio=[1.0] * 20, st_grad_cos=[0.98] * 20))
    assert check(RULE, run(q)) == []


def test_near_thresholds():
    space = [1.0] * 10  # input and output in the code space: the ratio is comparable
    assert check(RULE, run(qev(series=frame(st_grad_ratio=[0.011] * 10, st_code_space=space)))) == []
    f = one(RULE, run(qev(series=frame(st_grad_ratio=[0.009] * 10, st_code_space=space))))
    assert f.severity == "warning"


def test_short_dip_is_not_sustained():
    ratio = [1.0] * 10 + [0.0] * 4 + [1.0] * 10  # sustain_steps = 5
    assert check(RULE, run(qev(series=frame(st_grad_ratio=ratio)))) == []


def test_commitment_only_gradient_is_a_broken_path():
    # an inline taming-style quantizer returning q: the input sees the commitment term only
    ratio = list(np.geomspace(0.21, 0.019, 10))
    cos = list(np.linspace(-0.91, -0.22, 10))
    q = qev(series=frame(st_grad_ratio=ratio, st_grad_cos=cos,
                         st_grad_passthrough=[r * c for r, c in zip(ratio, cos, strict=True)],
                         st_grad_task_ratio=[0.0, 1e-6] * 5, st_code_space=[1.0] * 10), kind="vq")
    f = one(RULE, run(q))
    assert (f.severity, f.step) == ("error", 0)
    assert abs(f.evidence["st_grad_passthrough"]) < 0.01 and f.evidence["st_grad_cos"] == -0.22
    assert "commitment term only" in f.message


def test_commitment_dominated_but_intact_path_is_silent():
    # intact straight-through with a large commitment term: cosine ~ 1/ratio, passthrough ~ 1
    q = qev(series=frame(st_grad_ratio=[4.0] * 10, st_grad_cos=[0.26] * 10, st_grad_passthrough=[1.04] * 10,
                         st_grad_task_ratio=[0.97] * 10, st_code_space=[1.0] * 10))
    assert check(RULE, run(q)) == []


def test_rotation_trick_far_from_the_codes_is_silent():
    # lucidrains' rotation trick with inputs ~90 degrees from their codes: cosine and passthrough
    # near 0, but the non-commitment part of the input gradient is there (measured 0.24-0.9)
    q = qev(series=frame(st_grad_ratio=[0.25] * 10, st_grad_cos=[0.06] * 10, st_grad_passthrough=[0.014] * 10,
                         st_grad_task_ratio=[0.24] * 10, st_code_space=[1.0] * 10))
    assert check(RULE, run(q)) == []


def test_projected_quantizers_are_not_compared():
    # DAC in_proj/out_proj, lucidrains project_in, FSQ/LFQ, Gumbel, encodec's earlier RVQ stages:
    # healthy runs read cosine ~0 with ratios 0.4-14 there
    for ratio, cos in ((0.43, -0.007), (13.7, 0.07), (0.76, -0.002)):
        q = qev(series=frame(st_grad_ratio=[ratio] * 10, st_grad_cos=[cos] * 10,
                             st_grad_passthrough=[ratio * cos] * 10, st_code_space=[0.0] * 10))
        assert check(RULE, run(q)) == []


def test_a_cosine_lookup_far_from_unit_norm_is_not_compared():
    # a cosine codebook normalises z inside: the input gradient is the output's divided by ||z||
    # (||z|| = 611 after a learning-rate spike read task ratio 0.0013, passthrough 0.00095)
    cols = dict(st_grad_ratio=[0.0013] * 10, st_grad_cos=[0.73] * 10, st_grad_passthrough=[0.00095] * 10,
                st_grad_task_ratio=[0.0013] * 10, st_code_space=[1.0] * 10)
    assert check(RULE, run(qev(series=frame(**cols), metric="cosine"))) == []
    assert one(RULE, run(qev(series=frame(**cols)))).severity == "error"  # the same numbers, euclidean


def test_an_output_without_gradient():
    # the code returned from a buffer table without straight-through: the recorder writes ratio 0
    q = qev(series=frame(st_grad_ratio=[0.0] * 10, st_grad_passthrough=[0.0] * 10,
                         st_output_no_grad=[1.0] * 10, st_code_space=[1.0] * 10))
    f = one(RULE, run(q))
    assert f.severity == "error" and f.evidence["st_output_no_grad"] == 1.0
    assert "without the straight-through" in f.message and "(q - z).detach()" in f.fix


def test_detached_encoder_output():
    # vq(z.detach()): the input does not require grad; the recorder writes ratio 0
    q = qev(series=frame(st_grad_ratio=[0.0] * 10, st_grad_passthrough=[0.0] * 10,
                         st_input_no_grad=[1.0] * 10, st_code_space=[1.0] * 10))
    f = one(RULE, run(q, run_series=frame(grad_norm_encoder=[0.0] * 10, grad_norm_decoder=[1.0] * 10)))
    assert (f.severity, f.quantizer) == ("error", "quantizer")
    assert "detach" in f.message and f.evidence["st_input_no_grad"] == 1.0


def test_run_wide_encoder_without_gradient():
    rs = frame(grad_norm_encoder=[0.0] * 10, grad_norm_decoder=[2.5] * 10)
    f = one(RULE, run(run_series=rs))
    assert (f.quantizer, f.severity, f.step) == (None, "error", 0)


def test_saturated_encoder_with_an_intact_quantizer_is_not_a_broken_path():
    # a saturated sigmoid head kills the encoder's gradient; the quantizer itself passes it on
    rs = frame(grad_norm_encoder=[1e-9] * 10, grad_norm_decoder=[2.5] * 10)
    q = qev(series=frame(st_grad_ratio=[1.0] * 10, st_grad_cos=[0.99] * 10, st_grad_passthrough=[1.0] * 10,
                         st_code_space=[1.0] * 10))
    assert check(RULE, run(q, run_series=rs)) == []


def test_checkpoint_is_silent():
    assert check(RULE, checkpoint(qev({"perplexity": 1.0}))) == []


def test_checkpoints_with_an_encoder_that_did_not_move():
    def ev(enc: float, dec: float):
        e = checkpoint(qev())
        e.run.update(encoder_unchanged_fraction=enc, decoder_unchanged_fraction=dec, encoder_tensors=4.0)
        return e

    f = one(RULE, ev(1.0, 0.0))
    assert (f.severity, f.quantizer, f.evidence["encoder_tensors"]) == ("warning", None, 4)
    assert check(RULE, ev(0.98, 0.0)) == []  # part of the encoder moved
    assert check(RULE, ev(1.0, 0.9)) == []  # the decoder did not move either: a stalled run, not this
    assert check(RULE, ev(1.0, 0.9), decoder_unchanged_max=0.95)  # thresholds are parameters
