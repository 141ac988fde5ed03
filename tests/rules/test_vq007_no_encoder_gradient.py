"""VQ007 no-encoder-gradient: straight-through ratio from real autograd, cosine, run-wide norms."""

from __future__ import annotations

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
    assert check(RULE, run(qev(series=frame(st_grad_ratio=[0.011] * 10)))) == []
    f = one(RULE, run(qev(series=frame(st_grad_ratio=[0.009] * 10))))
    assert f.severity == "warning"


def test_short_dip_is_not_sustained():
    ratio = [1.0] * 10 + [0.0] * 4 + [1.0] * 10  # sustain_steps = 5
    assert check(RULE, run(qev(series=frame(st_grad_ratio=ratio)))) == []


def test_unrelated_gradient_direction_warns():
    q = qev(series=frame(st_grad_ratio=[0.8] * 10, st_grad_cos=[0.03] * 10))
    f = one(RULE, run(q))
    assert (f.severity, f.evidence["st_grad_cos"]) == ("warning", 0.03)


def test_run_wide_encoder_without_gradient():
    rs = frame(grad_norm_encoder=[0.0] * 10, grad_norm_decoder=[2.5] * 10)
    f = one(RULE, run(run_series=rs))
    assert (f.quantizer, f.severity, f.step) == (None, "error", 0)


def test_checkpoint_is_silent():
    assert check(RULE, checkpoint(qev({"perplexity": 1.0}))) == []
