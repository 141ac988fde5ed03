"""Audio codec quantizers (encodec core_vq, transformers EnCodec / Mimi / DAC, descript DAC layout)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tests.libs import encodec_core_vq
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.quantizers import discover

transformers = pytest.importorskip("transformers")
from transformers.models.dac.modeling_dac import DacConfig, DacModel  # noqa: E402
from transformers.models.encodec.modeling_encodec import (  # noqa: E402
    EncodecConfig,
    EncodecResidualVectorQuantizer,
)
from transformers.models.mimi.modeling_mimi import (  # noqa: E402
    MimiConfig,
    MimiSplitResidualVectorQuantizer,
)


def saved(module: nn.Module | None, tmp_path, name: str | None = "quantizer", dtype=None, sd=None,
          wrap=None):
    """Save the (`name`-prefixed) state dict, optionally wrapped by `wrap(sd)`, and open it with vqdoctor."""
    sd = sd if sd is not None else {(f"{name}.{k}" if name else k): v for k, v in module.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(wrap(sd) if wrap else sd, tmp_path / "ckpt.pt")
    return open_checkpoint(tmp_path / "ckpt.pt")


def all_claimed(states, src) -> bool:
    return {k for s in states for k in s.keys.values()} == set(src.keys())


def trained_encodec_rvq(dim: int, codebook_dim: int, n_q: int = 2):
    """encodec's core_vq ResidualVectorQuantization after k-means init and a few EMA updates."""
    core_vq = encodec_core_vq()
    rvq = core_vq.ResidualVectorQuantization(num_quantizers=n_q, dim=dim, codebook_size=32,
                                             codebook_dim=codebook_dim, kmeans_iters=2)
    rvq.train()
    for _ in range(3):
        rvq(torch.randn(2, dim, 40))
    return rvq


def test_encodec_core_vq_stages_with_projection(tmp_path):
    rvq = trained_encodec_rvq(dim=16, codebook_dim=8)
    holder = nn.Module()
    holder.vq = rvq
    audiocraft = {"rvq": {"n_q": 2, "bins": 32, "decay": 0.99, "threshold_ema_dead_code": 2}}
    src = saved(holder, tmp_path, wrap=lambda sd: {"best_state": {"model": sd}, "cfg": audiocraft})
    states = discover(src)
    assert states[0].decay == 0.99 and states[0].extra["threshold_ema_dead_code"] == 2
    assert states[0].extra["variant"] == "audiocraft"
    assert [(s.name, s.group, s.stage) for s in states] == [
        ("quantizer.vq.layers.0", "quantizer.vq", 0), ("quantizer.vq.layers.1", "quantizer.vq", 1)]
    for q, s in enumerate(states):
        cb = rvq.layers[q]._codebook
        assert (s.kind, s.library, s.metric, s.codebook_size, s.dim, s.input_dim) == (
            "vq-ema", "encodec", "euclidean", 32, 8, 16)
        assert s.initted is True and s.eps == 1e-5
        assert torch.equal(s.codebook[0], cb.embed) and s.codebook.shape == (1, 32, 8)
        assert torch.equal(s.cluster_size[0], cb.cluster_size) and s.embed_avg.shape == (1, 32, 8)
        assert torch.equal(s.project_in[0], rvq.layers[q].project_in.weight)
    assert all_claimed(states, src)

    half = discover(saved(holder, tmp_path, dtype=torch.bfloat16))
    assert half[0].dtypes["cluster_size"] == "bfloat16" and half[0].dtypes["codebook"] == "bfloat16"
    assert torch.equal(half[0].codebook[0], rvq.layers[0]._codebook.embed.to(torch.bfloat16).float())


def test_transformers_encodec_converted_from_core_vq(tmp_path):
    rvq = trained_encodec_rvq(dim=8, codebook_dim=8)
    hf = EncodecResidualVectorQuantizer(EncodecConfig(codebook_size=32, codebook_dim=8, target_bandwidths=[0.75]))
    # The conversion transformers ships for encodec checkpoints: `._codebook.` -> `.codebook.`.
    hf.load_state_dict({k.replace("._codebook.", ".codebook."): v for k, v in rvq.state_dict().items()})
    src = saved(hf, tmp_path)
    states = discover(src)
    assert [(s.name, s.group, s.stage, s.library) for s in states] == [
        ("quantizer.layers.0", "quantizer", 0, "transformers"), ("quantizer.layers.1", "quantizer", 1, "transformers")]
    assert torch.equal(states[1].codebook[0], hf.layers[1].codebook.embed)
    assert states[1].project_in is None and states[1].input_dim == 8
    assert all_claimed(states, src)


def test_mimi_split_rvq_groups_and_derived_codebook(tmp_path):
    config = MimiConfig(hidden_size=16, codebook_size=32, codebook_dim=8, vector_quantization_hidden_dimension=8,
                        num_quantizers=4, num_semantic_quantizers=1)
    q = MimiSplitResidualVectorQuantizer(config)
    for layer in [*q.semantic_residual_vector_quantizer.layers, *q.acoustic_residual_vector_quantizer.layers]:
        usage = torch.rand(32) * 10
        usage[:3] = 1e-8  # dead codes: the clamp decides their rows
        layer.codebook.cluster_usage.copy_(usage)
        layer.codebook.embed_sum.copy_(torch.randn(32, 8) * usage[:, None])
    src = saved(q, tmp_path)
    states = discover(src)
    sem, aco = "quantizer.semantic_residual_vector_quantizer", "quantizer.acoustic_residual_vector_quantizer"
    assert [(s.group, s.stage) for s in states] == [(sem, 0), (aco, 0), (aco, 1), (aco, 2)]
    for s, layer in zip(states, [*q.semantic_residual_vector_quantizer.layers,
                                 *q.acoustic_residual_vector_quantizer.layers], strict=True):
        assert (s.kind, s.library, s.codebook_size, s.dim, s.input_dim) == ("vq-ema", "transformers", 32, 8, 16)
        assert torch.equal(s.codebook[0], layer.codebook.embed)  # the module's own embed_sum / clamp(usage)
        assert torch.equal(s.cluster_size[0], layer.codebook.cluster_usage) and s.initted is True
    assert torch.equal(states[1].project_in[0], q.acoustic_residual_vector_quantizer.input_proj.weight[:, :, 0])
    assert states[0].project_in[1] is None and states[0].keys["codebook"].endswith("codebook.embed_sum")
    assert all_claimed(states, src)


def test_moshi_names_of_the_same_mimi_buffers(tmp_path):
    # kyutai's moshi (RSTnet and others build on it): rvq_first / rvq_rest.vq.layers.N._codebook
    # with embedding_sum, cluster_usage and _initialized, projections on the group
    config = MimiConfig(hidden_size=16, codebook_size=32, codebook_dim=8, vector_quantization_hidden_dimension=8,
                        num_quantizers=3, num_semantic_quantizers=1)
    q = MimiSplitResidualVectorQuantizer(config)
    rename = {"semantic_residual_vector_quantizer": "rvq_first", "acoustic_residual_vector_quantizer": "rvq_rest"}
    sd = {}
    for k, v in q.state_dict().items():
        group, rest = k.split(".", 1)
        rest = (rest.replace("layers.", "vq.layers.", 1).replace("codebook.embed_sum", "_codebook.embedding_sum")
                .replace("codebook.cluster_usage", "_codebook.cluster_usage")
                .replace("codebook.initialized", "_codebook._initialized"))
        sd[f"generator.quantizer.{rename[group]}.{rest}"] = v
    torch.save({"model": sd}, tmp_path / "moshi.pt")
    src = open_checkpoint(tmp_path / "moshi.pt")
    states = discover(src)
    first, rest = "generator.quantizer.rvq_first.vq", "generator.quantizer.rvq_rest.vq"
    assert [(s.group, s.stage, s.library) for s in states] == [(first, 0, "moshi"), (rest, 0, "moshi"),
                                                             (rest, 1, "moshi")]
    layer = q.acoustic_residual_vector_quantizer.layers[1]
    assert torch.equal(states[2].codebook[0], layer.codebook.embed)
    assert torch.equal(states[1].project_in[0], q.acoustic_residual_vector_quantizer.input_proj.weight[:, :, 0])
    assert all_claimed(states, src)


def tiny_dac() -> DacModel:
    return DacModel(DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=8,
                              upsampling_ratios=[2, 2], n_codebooks=3, codebook_size=16, codebook_dim=4))


def test_transformers_dac_plain_and_weight_norm(tmp_path):
    model = tiny_dac()
    states = discover(saved(model, tmp_path, name=None))  # the whole model: nothing else may be taken
    assert [(s.name, s.group, s.stage) for s in states] == [
        (f"quantizer.quantizers.{q}", "quantizer", q) for q in range(3)]
    for s, layer in zip(states, model.quantizer.quantizers, strict=True):
        assert (s.kind, s.library, s.metric, s.codebook_size, s.dim, s.input_dim) == (
            "vq", "transformers", "cosine", 16, 4, 16)
        assert torch.equal(s.codebook[0], layer.codebook.weight)
        assert torch.equal(s.project_in[0], layer.in_proj.weight[:, :, 0])
        assert torch.equal(s.project_in[1], layer.in_proj.bias) and "weight_norm" not in s.extra

    model.apply_weight_norm()
    states = discover(saved(model, tmp_path, name=None))
    assert len(states) == 3
    for s, layer in zip(states, model.quantizer.quantizers, strict=True):
        assert s.extra["weight_norm"] is True and s.library == "transformers"
        assert torch.allclose(s.project_in[0], layer.in_proj.weight[:, :, 0].detach(), atol=1e-6)
        assert s.keys["project_in.weight_v"].endswith("in_proj.parametrizations.weight.original1")


def test_descript_dac_layout_weight_norm_resolved(tmp_path):
    """descript-audio-codec is not installed: its layout, built with torch's own `weight_norm` convs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convs = [(nn.utils.weight_norm(nn.Conv1d(1024, 8, 1)), nn.utils.weight_norm(nn.Conv1d(8, 1024, 1)))
                 for _ in range(2)]
    sd = {}
    for q, (cin, cout) in enumerate(convs):
        p = f"quantizer.quantizers.{q}"
        sd[f"{p}.in_proj.weight_g"], sd[f"{p}.in_proj.weight_v"] = cin.weight_g, cin.weight_v
        sd[f"{p}.in_proj.bias"] = cin.bias
        sd[f"{p}.out_proj.weight_g"], sd[f"{p}.out_proj.weight_v"] = cout.weight_g, cout.weight_v
        sd[f"{p}.out_proj.bias"] = cout.bias
        sd[f"{p}.codebook.weight"] = torch.randn(1024, 8)
    src = saved(None, tmp_path, sd={k: v.detach() for k, v in sd.items()})
    assert src.infos["quantizer.quantizers.0.in_proj.weight_g"].shape == (8, 1, 1)
    assert src.infos["quantizer.quantizers.0.in_proj.weight_v"].shape == (8, 1024, 1)
    states = discover(src)
    assert [(s.name, s.library, s.kind, s.metric) for s in states] == [
        (f"quantizer.quantizers.{q}", "descript-audio-codec", "vq", "cosine") for q in range(2)]
    for s, (cin, _) in zip(states, convs, strict=True):
        assert (s.codebook_size, s.dim, s.input_dim, s.extra["weight_norm"]) == (1024, 8, 1024, True)
        assert torch.allclose(s.project_in[0], cin.weight[:, :, 0].detach(), atol=1e-6)
        assert s.dtypes["project_in.weight_g"] == "float32"
    assert all_claimed(states, src)
