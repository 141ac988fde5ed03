"""Image-model quantizer layouts found in checkpoints of real, briefly trained modules.

diffusers `VQModel` is the real library; taming, rosinality, zalando, Sonnet-style, torchmultimodal
and VideoGPT quantizers are the faithful re-implementations in `tests/fixtures`. Checkpoints go
through `torch.save` and `open_checkpoint` unless a test is about the adapters alone.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.reference_models import trained
from tests.sources import source_from_state_dict
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.quantizers import discover
from vqdoctor.quantizers.rosinality import ADAPTER as ROSINALITY


def saved(tmp_path, sd, container: str | None = None, prefix: str = ""):
    """`sd` written with torch.save (optionally as `{container: {prefix + key: ...}}`) and opened."""
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save({container: sd, "global_step": 3} if container else sd, tmp_path / "ckpt.pt")
    return open_checkpoint(tmp_path / "ckpt.pt")


def smoothed(counts: torch.Tensor, eps: float) -> torch.Tensor:  # Laplace smoothing, as upstream
    n = counts.sum(-1, keepdim=True)
    return (counts + eps) / (n + counts.shape[-1] * eps) * n


# layout -> [(state name, kind, library, K, D, model -> effective lookup table [K, D])]
LAYOUTS = {
    "taming-vq2": [("quantize", "vq", "taming-transformers", 32, 4, lambda m: m.quantize.embedding.weight)],
    "taming-gumbel": [("quantize", "gumbel", "taming-transformers", 24, 6, lambda m: m.quantize.embed.weight)],
    "taming-ema": [("quantize", "vq-ema", "taming-transformers", 32, 4, lambda m: m.quantize.embedding.weight)],
    "rosinality": [("quantize_t", "vq-ema", "rosinality", 32, 8, lambda m: m.quantize_t.embed.t()),
                   ("quantize_b", "vq-ema", "rosinality", 16, 8, lambda m: m.quantize_b.embed.t())],
    "zalando-ema": [("_vq_vae", "vq-ema", "zalando", 32, 4, lambda m: m._vq_vae._embedding.weight)],
    "zalando-vq": [("_vq_vae", "vq", "zalando", 32, 4, lambda m: m._vq_vae._embedding.weight)],
    "sonnet": [("vq", "vq-ema", "sonnet", 24, 6, lambda m: m.vq.embeddings.t())],
    "torchmultimodal": [("codebook", "vq-ema", "torchmultimodal", 24, 6, lambda m: m.codebook.embedding)],
    "videogpt": [("codebook", "vq-ema", "videogpt", 24, 6, lambda m: m.codebook.embeddings)],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_found_with_its_lookup_table(layout, tmp_path):
    model = trained(layout)
    states = discover(saved(tmp_path, model.state_dict()))
    assert [(s.name, s.kind, s.library, s.codebook_size, s.dim) for s in states] == \
        [e[:5] for e in LAYOUTS[layout]]
    for state, (*_, lookup) in zip(states, LAYOUTS[layout], strict=True):
        assert state.codebook.dtype == torch.float32 and state.codebook.shape == (1, *lookup(model).shape)
        torch.testing.assert_close(state.codebook[0], lookup(model).detach())
        assert state.dtypes["codebook"] == "float32" and state.group is None
        if state.kind == "vq-ema":  # counts and sums oriented like the codebook: [1, K], [1, K, D]
            assert state.cluster_size.shape == (1, state.codebook_size)
            assert state.embed_avg.shape == state.codebook.shape
    all_keys = [k for s in states for k in s.keys.values()]
    assert len(all_keys) == len(set(all_keys))  # nothing claimed twice


def test_diffusers_vqmodel_trained_is_found_as_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.VQModel(block_out_channels=(8,), layers_per_block=1, latent_channels=3,
                              num_vq_embeddings=64, norm_num_groups=4, sample_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.quantize.embedding.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(2, 3, 8, 8)
        out = model(x)
        (torch.nn.functional.mse_loss(out.sample, x) + out.commit_loss.mean()).backward()
        opt.step()
    assert not torch.equal(before, model.quantize.embedding.weight)  # really trained

    [state] = discover(source_from_state_dict(model.state_dict()))  # no config: told by key names
    assert (state.name, state.kind, state.library) == ("quantize", "vq", "diffusers")
    assert (state.codebook_size, state.dim) == (64, 3)
    torch.testing.assert_close(state.codebook[0], model.quantize.embedding.weight.detach())
    assert state.keys == {"codebook": "quantize.embedding.weight"} and state.dtypes == {"codebook": "float32"}
    model.save_pretrained(tmp_path)  # a diffusers folder: safetensors + config.json
    [folder] = discover(open_checkpoint(tmp_path))
    assert folder.library == "diffusers" and torch.equal(folder.codebook, state.codebook)


def test_quantize_embedding_library_from_config_or_taming_style():
    model = trained("taming-vq2", steps=1)
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(("quant", "post_quant"))}
    [plain] = discover(source_from_state_dict(sd))
    [diff] = discover(source_from_state_dict(sd, config={"_class_name": "VQModel",
                                                         "_diffusers_version": "0.42.1"}))
    assert (plain.library, diff.library) == ("taming-style", "diffusers")
    assert any("taming-style" in n for n in plain.notes)


def test_lightning_container_with_model_prefix(tmp_path):
    model = trained("taming-ema")
    src = saved(tmp_path, model.state_dict(), container="state_dict", prefix="model.")
    [state] = discover(src)
    assert (state.name, state.kind, state.eps, src.container) == ("model.quantize", "vq-ema", 1e-5, "state_dict")
    torch.testing.assert_close(state.cluster_size[0], model.quantize.embedding.cluster_size.detach())
    torch.testing.assert_close(state.embed_avg[0], model.quantize.embedding.embed_avg.detach())
    # taming's EMA invariant holds with its eps: embed = embed_avg / smoothed(cluster_size)
    torch.testing.assert_close(state.codebook, state.embed_avg / smoothed(state.cluster_size, 1e-5)[..., None])


def test_rosinality_transposed_levels_noted(tmp_path):
    model = trained("rosinality")
    top, bottom = discover(saved(tmp_path, model.state_dict()))  # separate quantizers, no group
    torch.testing.assert_close(top.embed_avg[0], model.quantize_t.embed_avg.t())
    torch.testing.assert_close(bottom.cluster_size[0], model.quantize_b.cluster_size)
    assert any("top" in n for n in top.notes) and any("bottom" in n for n in bottom.notes)
    assert top.keys["codebook"] == "quantize_t.embed" and top.eps == 1e-5


def test_rosinality_square_table_oriented_by_ema_invariant():
    model = trained("rosinality-square")  # dim == n_embed == 16, and no `quantize_t` name to go by
    sd = {k.replace("quantize_t", "levels.0"): v for k, v in model.state_dict().items() if "_t." in k}
    [state] = ROSINALITY.find(source_from_state_dict(sd), set())
    assert state.name == "levels.0"
    torch.testing.assert_close(state.codebook[0], model.quantize_t.embed.t())


def test_zalando_counts_are_smoothed_and_dtypes_kept():
    model = trained("zalando-ema")
    sd = {k: v.to(torch.bfloat16) if "_vq_vae._ema" in k else v for k, v in model.state_dict().items()}
    [state] = discover(source_from_state_dict(sd))
    assert state.counts_smoothed is True and state.cluster_size.dtype == torch.float32
    assert state.dtypes == {"codebook": "float32", "cluster_size": "bfloat16", "embed_avg": "bfloat16"}
    # zalando stores smoothed counts: embedding == ema_w / ema_cluster_size (checked in float32 here)
    exact = model._vq_vae._ema_w.detach() / model._vq_vae._ema_cluster_size[:, None]
    torch.testing.assert_close(state.codebook[0], exact)


def test_sonnet_reads_debiased_averages_and_claims_accumulators(tmp_path):
    model = trained("sonnet")
    [state] = discover(saved(tmp_path, model.state_dict()))
    torch.testing.assert_close(state.cluster_size[0], model.vq.ema_cluster_size.average)
    torch.testing.assert_close(state.embed_avg[0], model.vq.ema_dw.average.t())
    assert {"ema_cluster_size.hidden", "ema_dw._counter"} <= set(state.keys) and state.eps == 1e-5
    torch.testing.assert_close(state.codebook, state.embed_avg / smoothed(state.cluster_size, 1e-5)[..., None])


@pytest.mark.parametrize(("layout", "smoothed_counts"), [("torchmultimodal", True), ("videogpt", False)])
def test_ema_codebooks_eps_and_smoothing(layout, smoothed_counts):
    [state] = discover(source_from_state_dict(trained(layout).state_dict()))
    assert state.counts_smoothed is smoothed_counts and state.eps == 1e-7
