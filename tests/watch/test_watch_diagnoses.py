"""End to end: a real tiny training with a known failure, watched; the report's first finding names it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import vqdoctor
from tests.watch.watch_models import (
    BrokenSTQuantizer,
    QuantAE,
    diffusers_vq,
    lucid_vq,
    make_data,
    train,
    unpack_diffusers,
)

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

STEPS = 150


def _healthy() -> dict[str, Any]:
    # 512 tokens per step for 32 codes: 16 expected hits per code, k-means init, light replacement
    return {"model": QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8))}


def _dead_codes() -> dict[str, Any]:
    # a 64-d N(0, 1) codebook, no k-means, no replacement; the data live on an 8-d manifold
    vq = lucid_vq(dim=64, codebook_size=256, kmeans_init=False, threshold_ema_dead_code=0, decay=0.99)
    with torch.no_grad():
        vq._codebook.embed.normal_()
        # keep the EMA sums consistent with the counts (ones before vector-quantize-pytorch 1.34,
        # zeros since): embed_avg = embed * cluster_size under either arithmetic
        vq._codebook.embed_avg.copy_(vq._codebook.embed * vq._codebook.cluster_size[..., None])
    return {"model": QuantAE(vq, code_dim=64, z_scale=4.0)}


def _scale_mismatch() -> dict[str, Any]:
    # diffusers' uniform(+-1/K) codebook against encoder outputs x100
    return {"model": QuantAE(diffusers_vq(), layout="bdhw", unpack=unpack_diffusers, z_scale=100.0)}


def _eval_mutation() -> dict[str, Any]:
    # "the VQ kept in training mode during evaluation": EMA statistics updated by no_grad passes
    model = QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8))
    evaluation = make_data(3, seed=7, scale=20.0)  # another distribution, far from the training data

    def evaluate(i: int) -> None:
        if i % 20 == 10:
            with torch.no_grad():
                for x in evaluation:
                    model(x)

    return {"model": model, "hook": evaluate}


def _non_finite() -> dict[str, Any]:
    data = make_data(STEPS)
    for x in data[80:]:
        x[0, 0, 0] = float("inf")
    return {"model": QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8)),
            "data": data}


def _no_encoder_gradient() -> dict[str, Any]:
    # the decoder gets the raw codes (no z + (q - z).detach()); no commitment term either
    return {"model": QuantAE(BrokenSTQuantizer(beta=0.0), name="quantize", unpack=lambda o: (o[0], o[1]))}


def _frozen_codebook() -> dict[str, Any]:
    # gradient-trained codebook (diffusers) left out of the optimizer
    model = QuantAE(diffusers_vq(), layout="bdhw", unpack=unpack_diffusers)
    with torch.no_grad():
        model.quantizer.embedding.weight.normal_(0, 0.5)
    opt = torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters()], 3e-3)
    return {"model": model, "opt": opt}


def _frozen_ema() -> dict[str, Any]:
    return {"model": QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=0, decay=1.0))}


def _loss_divergence() -> dict[str, Any]:
    return {"model": QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8)),
            "lr": 5.0, "sgd": True}


CASES: dict[str, tuple[Callable[[], dict[str, Any]], str | None]] = {
    "healthy": (_healthy, None),
    "dead-codes": (_dead_codes, "dead-codes"),
    "scale-mismatch": (_scale_mismatch, "scale-mismatch"),
    "eval-mutation": (_eval_mutation, "ema-divergence"),
    "non-finite-loss": (_non_finite, "non-finite"),
    "no-encoder-gradient": (_no_encoder_gradient, "no-encoder-gradient"),
    "frozen-codebook-not-in-optimizer": (_frozen_codebook, "frozen-codebook"),
    "frozen-codebook-ema-decay-1": (_frozen_ema, "frozen-codebook"),
    "loss-divergence": (_loss_divergence, "loss-divergence"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_finding(tmp_path, case):
    build, expected = CASES[case]
    spec = build()
    model = spec.pop("model")
    data = spec.pop("data", None) or make_data(STEPS)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=25, stats_every=5) as doctor:
        train(model, data, doctor=doctor, **spec)
    report = vqdoctor.report(tmp_path / "run")
    summary = [(f.id, f.severity, f.step, f.message) for f in report.findings]
    if expected is None:
        assert report.verdict == "healthy", summary
        assert report.diagnosis is None
    else:
        assert report.findings[0].id == expected, summary
        assert report.findings[0].severity in ("error", "warning")
        assert report.findings[0].step is not None  # run findings say when they first held
    # the in-process report agrees with the one from the store
    assert [f.id for f in doctor.report().findings] == [f.id for f in report.findings]
