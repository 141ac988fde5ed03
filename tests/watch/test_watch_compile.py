"""A model under torch.compile still trains with the watch attached, and gets every signal.

The backend is `aot_eager`: it runs dynamo (which graph-breaks around the watch's hooks) and
AOTAutograd (compiled forward/backward graphs, whose outputs carry the straight-through
gradient hooks) without inductor's code generation, which takes ~20 s on a shared CPU. The
inductor runs (vector-quantize-pytorch and diffusers quantizers, whole model and quantizer
alone) were checked by hand (see `vqdoctor.live.doctor.COMPILE_NOTES`). diffusers' quantizer keeps
dynamo's tracing short; vector-quantize-pytorch takes ~20 s to trace here.
"""

from __future__ import annotations

import pytest
import torch

import vqdoctor
from tests.watch.watch_models import QuantAE, diffusers_vq, make_data, train, unpack_diffusers

SIGNALS = ["perplexity", "usage_window", "z_norm_median", "code_norm_median", "quant_error_rel",
           "codebook_rms_change", "st_grad_ratio", "st_grad_cos", "nonfinite_input", "eval_mutation",
           "grad_norm_codebook"]


@pytest.mark.parametrize("what", ["model", "quantizer"])
def test_compiled_model_trains_and_records(tmp_path, what):
    torch._dynamo.reset()
    model = QuantAE(diffusers_vq(), layout="bdhw", unpack=unpack_diffusers)
    if what == "model":
        target = torch.compile(model, backend="aot_eager")
    else:
        model.quantizer = torch.compile(model.quantizer, backend="aot_eager")
        target = model
    with vqdoctor.watch(target, tmp_path / "run", flush_every=10, stats_every=5) as doctor:
        assert [q.name for q in doctor.quantizers] == ["quantizer"]
        losses = train(target, make_data(20), doctor=doctor)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    df = vqdoctor.load_run(tmp_path / "run")
    q = df[df.quantizer == "quantizer"]
    assert sorted(q["step"]) == list(range(20))
    for name in SIGNALS:
        assert q[name].notna().any(), name
    run = df[df.quantizer == ""]
    assert run["grad_norm_encoder"].notna().any() and run["loss"].notna().all()


def test_compiled_after_the_watch_started(tmp_path):
    """torch.compile called inside the watch: the hooks were registered before dynamo saw the model."""
    from tests.watch.watch_models import BrokenSTQuantizer

    torch._dynamo.reset()
    model = QuantAE(BrokenSTQuantizer(beta=0.25), name="quantize", unpack=lambda o: (o[0], o[1]))
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10, stats_every=5) as doctor:
        compiled = torch.compile(model, backend="aot_eager")
        train(compiled, make_data(20), doctor=doctor)
    df = vqdoctor.load_run(tmp_path / "run")
    q = df[df.quantizer == "quantize"]
    assert sorted(q["step"]) == list(range(20))
    assert q["perplexity"].notna().all() and q["st_grad_ratio"].notna().sum() == 4
