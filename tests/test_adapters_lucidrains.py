"""vector-quantize-pytorch layouts found in real state dicts of real, briefly trained modules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.libs import LUCIDRAINS_ZERO_INIT
from tests.sources import source_from_state_dict
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.errors import NoQuantizerError
from vqdoctor.quantizers import discover
from vqdoctor.quantizers.lucidrains import fsq_state

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

vqp = pytest.importorskip("vector_quantize_pytorch")
LIB = "vector-quantize-pytorch"


def saved(module: nn.Module, tmp_path, name: str = "vq", config=None, dtype=None, optimizer=None,
          fmt: str = "torch"):
    """Save `module` as submodule `name` of a model and open the file with vqdoctor's reader.

    With a config or an optimizer the file is a Lightning-style checkpoint (`state_dict` with a
    `model.` prefix, `hyper_parameters`, `optimizer_states`), otherwise a raw state dict.
    """
    holder = nn.Module()
    holder.add_module(name, module)
    sd = holder.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif config is None and optimizer is None:
        torch.save(sd, path)
    else:
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "hyper_parameters": config or {},
                    "optimizer_states": [optimizer.state_dict()] if optimizer else []}, path)
    return open_checkpoint(path)


def train(module: nn.Module, dim: int = 16, steps: int = 3, tokens: int = 64):
    """A few train-mode forwards so EMA buffers (and k-means init) hold real values."""
    module.train()
    for _ in range(steps):
        module(torch.randn(2, tokens // 2, dim))
    return module


def all_claimed(states, src) -> bool:
    """Every tensor of the quantizer-only model was claimed by the states found, and only once."""
    used = [k for s in states for k in s.keys.values()]
    return set(used) == set(src.keys())


def test_vector_quantize_euclidean_with_projection(tmp_path):
    vq = train(vqp.VectorQuantize(dim=16, codebook_size=32, codebook_dim=8, decay=0.8,
                                  threshold_ema_dead_code=2))
    src = saved(vq, tmp_path, config={"model": {"vq": {"decay": 0.8, "threshold_ema_dead_code": 2}}})
    [s] = discover(src)
    assert (s.name, s.kind, s.library, s.metric) == ("model.vq", "vq-ema", LIB, "euclidean")
    assert (s.codebook_size, s.dim, s.heads, s.input_dim, s.input_heads) == (32, 8, 1, 16, 1)
    assert s.group is None and s.stage is None and s.initted is True
    assert torch.equal(s.codebook, vq._codebook.embed)
    assert torch.equal(s.cluster_size, vq._codebook.cluster_size) and s.cluster_size.shape == (1, 32)
    assert torch.equal(s.embed_avg, vq._codebook.embed_avg) and s.embed_avg.shape == (1, 32, 8)
    assert torch.equal(s.project_in[0], vq.project_in.weight) and torch.equal(s.project_in[1], vq.project_in.bias)
    assert s.keys["codebook"] == "model.vq._codebook.embed" and s.dtypes["codebook"] == "float32"
    assert s.dtypes["initted"] == "bool"
    assert s.decay == 0.8 and s.eps == 1e-5 and s.extra["threshold_ema_dead_code"] == 2
    assert all_claimed([s], src)


def test_cosine_separate_heads_inferred_and_bf16(tmp_path):
    vq = train(vqp.VectorQuantize(dim=16, codebook_size=32, codebook_dim=4, heads=2,
                                  separate_codebook_per_head=True, use_cosine_sim=True))
    [s] = discover(saved(vq, tmp_path))
    assert s.metric == "cosine" and any("cosine" in n for n in s.notes)
    assert (s.heads, s.input_heads, s.dim, s.input_dim) == (2, 2, 4, 16)
    assert torch.equal(s.codebook, vq._codebook.embed)
    assert s.cluster_size.shape == (2, 32) and s.embed_avg.shape == (2, 32, 4)

    src = saved(vq, tmp_path, dtype=torch.bfloat16)
    [b] = discover(src)
    assert b.metric == "cosine" and b.codebook.dtype == torch.float32
    assert b.dtypes == {**s.dtypes, **{r: "bfloat16" for r in s.dtypes if r != "initted"}}
    assert torch.equal(b.codebook, vq._codebook.embed.to(torch.bfloat16).float())
    assert all_claimed([b], src)


def test_cosine_from_config_and_shared_heads(tmp_path):
    vq = train(vqp.VectorQuantize(dim=16, codebook_size=32, codebook_dim=4, heads=2))
    [s] = discover(saved(vq, tmp_path, config={"use_cosine_sim": False}))
    assert s.metric == "euclidean" and not s.notes
    assert (s.heads, s.input_heads, s.dim, s.input_dim) == (1, 2, 4, 16)
    cos = train(vqp.VectorQuantize(dim=16, codebook_size=32, use_cosine_sim=True))
    [c] = discover(saved(cos, tmp_path, config={"use_cosine_sim": True}))
    assert c.metric == "cosine" and not c.notes


def test_layernorm_after_project_in(tmp_path):
    vq = train(vqp.VectorQuantize(dim=16, codebook_size=32, codebook_dim=4, layernorm_after_project_in=True))
    src = saved(vq, tmp_path)
    [s] = discover(src)
    assert torch.equal(s.project_in[0], vq.project_in[0].weight) and s.extra["layernorm_after_project_in"]
    assert (s.input_dim, s.dim) == (16, 4) and all_claimed([s], src)


def test_learnable_codebook_is_gradient_vq_with_optimizer_moments(tmp_path):
    vq = vqp.VectorQuantize(dim=16, codebook_size=32, learnable_codebook=True, ema_update=False)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
    for _ in range(3):
        _, _, loss = vq.train()(torch.randn(2, 32, 16))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    [s] = discover(saved(vq, tmp_path, optimizer=opt))
    assert s.kind == "vq" and s.notes  # no config: EMA statistics never moved, the codebook did
    assert torch.equal(s.codebook, vq._codebook.embed.detach())
    assert s.embed_avg is not None  # still stored
    moments = opt.state[vq._codebook.embed]
    assert torch.equal(s.optimizer["exp_avg"], moments["exp_avg"])
    assert torch.equal(s.optimizer["exp_avg_sq"], moments["exp_avg_sq"])
    [c] = discover(saved(vq, tmp_path, config={"ema_update": False, "learnable_codebook": True}))
    assert c.kind == "vq" and not c.notes and c.decay is None
    [f] = discover(saved(vq, tmp_path, fmt="safetensors"))  # no key-order signal in safetensors
    assert f.kind == "vq" and f.name == "vq"


def test_parameter_codebook_with_ema_stays_ema(tmp_path):
    vq = train(vqp.VectorQuantize(dim=16, codebook_size=32, orthogonal_reg_weight=1.0))
    [s] = discover(saved(vq, tmp_path))
    assert s.kind == "vq-ema" and s.extra["is_parameter"] is True and s.notes


def test_kmeans_pending_and_old_layouts(tmp_path):
    pending = vqp.VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)
    [s] = discover(saved(pending, tmp_path))
    assert s.initted is False and s.metric == "euclidean" and s.kind == "vq-ema"

    vq = train(vqp.VectorQuantize(dim=8, codebook_size=16), dim=8)
    cb = vq._codebook
    old = {"vq._codebook.initted": torch.tensor([1.0]), "vq._codebook.cluster_size": cb.cluster_size[0],
           "vq._codebook.embed_avg": cb.embed_avg[0], "vq._codebook.embed": cb.embed[0]}
    [o] = discover(source_from_state_dict(old))
    assert o.initted is True and o.dtypes["initted"] == "float32"
    assert o.codebook.shape == (1, 16, 8) and torch.equal(o.codebook, cb.embed)
    assert o.cluster_size.shape == (1, 16)


def test_affine_param_effective_codebook_reproduces_lookup(tmp_path):
    vq = train(vqp.VectorQuantize(dim=8, codebook_size=16, affine_param=True), dim=8)
    x = torch.randn(1, 40, 8)
    _, idx, _ = vq.eval()(x)  # eval forwards still move the batch statistics: save afterwards
    src = saved(vq, tmp_path)
    [s] = discover(src)
    assert torch.equal(torch.cdist(x[0], s.codebook[0]).argmin(-1), idx[0])
    assert torch.equal(s.extra["raw_codebook"], vq._codebook.embed)
    assert all_claimed([s], src)


def test_residual_and_grouped_residual_vq(tmp_path):
    rvq = train(vqp.ResidualVQ(dim=16, codebook_size=32, codebook_dim=8, num_quantizers=3))
    src = saved(rvq, tmp_path, name="rvq")
    states = discover(src)
    assert [s.name for s in states] == [f"rvq.layers.{q}" for q in range(3)]
    for q, s in enumerate(states):
        assert (s.group, s.stage, s.kind, s.dim, s.input_dim) == ("rvq", q, "vq-ema", 8, 16)
        assert torch.equal(s.codebook, rvq.layers[q]._codebook.embed)
        assert torch.equal(s.project_in[0], rvq.project_in.weight)
    assert all_claimed(states, src)

    grvq = train(vqp.GroupedResidualVQ(dim=16, codebook_size=32, num_quantizers=2, groups=2))
    src = saved(grvq, tmp_path, name="grvq")
    states = discover(src)
    assert [(s.name, s.group, s.stage) for s in states] == [
        (f"grvq.rvqs.{g}.layers.{q}", f"grvq.rvqs.{g}", q) for g in range(2) for q in range(2)]
    assert torch.equal(states[3].codebook, grvq.rvqs[1].layers[1]._codebook.embed)
    assert all(s.dim == 8 and s.project_in is None for s in states)
    assert all_claimed(states, src)


def test_lfq_and_residual_lfq(tmp_path):
    lfq = vqp.LFQ(dim=16, codebook_size=16, num_codebooks=2)
    src = saved(lfq, tmp_path, name="lfq")
    [s] = discover(src)
    assert (s.name, s.kind, s.codebook_size, s.dim, s.codebook) == ("lfq", "lfq", 16, 4, None)
    assert (s.input_dim, s.input_heads, s.dtypes["mask"]) == (16, 2, "int64")
    assert all_claimed([s], src)

    rlfq = vqp.ResidualLFQ(dim=16, codebook_size=64, num_quantizers=2)
    src = saved(rlfq, tmp_path, name="rlfq")
    states = discover(src)
    assert [(s.name, s.group, s.stage, s.codebook_size) for s in states] == [
        ("rlfq.layers.0", "rlfq", 0, 64), ("rlfq.layers.1", "rlfq", 1, 64)]
    assert all(s.input_dim == 16 for s in states) and all_claimed(states, src)


def test_simvq_effective_codebook(tmp_path):
    sim = vqp.SimVQ(dim=16, codebook_size=64, frozen_codebook_dim=8)
    sim.train()(torch.randn(2, 8, 16))
    src = saved(sim, tmp_path, name="q")
    [s] = discover(src)
    assert (s.name, s.kind, s.codebook_size, s.dim, s.extra["frozen_dim"]) == ("q", "simvq", 64, 16, 8)
    assert torch.allclose(s.codebook[0], sim.codebook.detach(), atol=1e-6)
    assert s.keys["codebook"] == "q.frozen_codebook" and all_claimed([s], src)

    rsim = vqp.ResidualSimVQ(dim=16, codebook_size=32, num_quantizers=2)
    states = discover(saved(rsim, tmp_path, name="r"))
    assert [(s.group, s.stage) for s in states] == [("r", 0), ("r", 1)]
    assert torch.allclose(states[1].codebook[0], rsim.layers[1].codebook.detach(), atol=1e-6)


def test_fsq_needs_levels_from_config(tmp_path):
    fsq = vqp.FSQ(levels=[8, 5, 5], dim=16)
    with pytest.raises(NoQuantizerError):
        discover(saved(fsq, tmp_path, name="fsq"))
    src = saved(fsq, tmp_path, name="fsq", config={"levels": [8, 5, 5]})
    [s] = discover(src)
    assert (s.name, s.kind, s.codebook_size, s.dim, s.levels, s.input_dim) == (
        "model.fsq", "fsq", 200, 3, (8, 5, 5), 16)
    assert torch.equal(s.project_in[0], fsq.project_in.weight) and all_claimed([s], src)

    rfsq = vqp.ResidualFSQ(levels=[8, 5, 5], dim=16, num_quantizers=2)
    states = discover(saved(rfsq, tmp_path, name="r", config={"fsq_levels": [8, 5, 5], "num_quantizers": 2}))
    assert [(s.name, s.group, s.stage) for s in states] == [
        ("model.r.layers.0", "model.r", 0), ("model.r.layers.1", "model.r", 1)]


def test_fsq_without_projection_is_named_by_config_only(tmp_path):
    model = nn.Sequential(nn.Linear(8, 3), vqp.FSQ(levels=[8, 5, 5], dim=3))  # FSQ stores nothing here
    [s] = discover(saved(model, tmp_path, name="net", config={"levels": [8, 5, 5]}))
    assert (s.name, s.kind, s.codebook_size, s.keys) == ("", "fsq", 200, {}) and s.notes


def test_fsq_state_helper():
    w = torch.randn(8, 32)
    s = fsq_state("q", [8, 6, 5, 5], (w, None), library="generic")
    assert (s.kind, s.codebook_size, s.dim, s.input_dim, s.input_heads, s.library) == ("fsq", 1200, 4, 32, 2, "generic")


def test_reset_cluster_size_from_config_is_the_reset_value(tmp_path):
    """lucidrains <= 1.32 resets a replaced code's count to `reset_cluster_size` (default: the
    threshold): a config that names it makes replaced_fraction exact, without inference. From 1.34
    the reset count is `reset_cluster_size_ratio` x the mean count of that step, so the codes reset
    in the last forward share one exact value, found without the config."""
    from vqdoctor.metrics.codebook import codebook_metrics

    if LUCIDRAINS_ZERO_INIT:
        vq = vqp.VectorQuantize(dim=16, codebook_size=32, decay=0.8, dead_code_threshold_ratio=0.5)
        last: dict[str, float] = {}
        replace = vq._codebook.replace

        def observed(samples, batch_mask, seq_mask=None):  # the library's own call, recorded
            last["share"] = float(batch_mask.float().mean())
            return replace(samples, batch_mask=batch_mask, seq_mask=seq_mask)

        vq._codebook.replace = observed
        vq.train()
        for _ in range(3):
            last.clear()
            vq(torch.randn(2, 32, 16))
        assert 0 < last["share"] < 1  # the final forward replaced some codes
        [s] = discover(saved(vq, tmp_path, config={"vq": {"dead_code_threshold_ratio": 0.5}}))
        assert s.ema_rule == "eps-blend" and s.extra["dead_code_threshold_ratio"] == 0.5
        m = codebook_metrics(s)
        assert m["replaced_fraction"] == pytest.approx(last["share"])
        assert m["replace_threshold_to_expected"] == pytest.approx(0.5)
        return
    vq = vqp.VectorQuantize(dim=16, codebook_size=32, decay=0.8, threshold_ema_dead_code=2)
    vq._codebook.reset_cluster_size = 0.5  # a codebook argument VectorQuantize does not expose
    train(vq)
    src = saved(vq, tmp_path, config={"vq": {"threshold_ema_dead_code": 2, "reset_cluster_size": 0.5}})
    [s] = discover(src)
    assert s.extra["reset_cluster_size"] == 0.5 and s.ema_rule == "laplace"
    expected = float((vq._codebook.cluster_size == 0.5).float().mean())
    assert 0 < expected < 1  # below 1: never inferred without the config
    assert codebook_metrics(s)["replaced_fraction"] == expected
