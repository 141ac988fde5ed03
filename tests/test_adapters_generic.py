"""The generic fallback adapter and `--quantizer PREFIX` (`generic.explicit`), on real trained modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.fixtures.reference_ema import DemoEMAQuantizer
from tests.fixtures.reference_models import CodebookAutoencoder, TokenModel, train, trained
from tests.sources import source_from_state_dict
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.errors import NoQuantizerError
from vqdoctor.quantizers import discover
from vqdoctor.quantizers.generic import explicit

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library


def test_demo_layout_found_by_generic(tmp_path):
    model = trained("demo")
    torch.save({"model": model.state_dict()}, tmp_path / "demo.pt")
    [state] = discover(open_checkpoint(tmp_path / "demo.pt"))
    q = model.quantizer
    assert (state.name, state.kind, state.library) == ("quantizer", "vq-ema", "generic")
    assert (state.codebook_size, state.dim, state.initted, state.eps) == (24, 6, True, 1e-5)
    torch.testing.assert_close(state.codebook[0], q.embed)
    torch.testing.assert_close(state.cluster_size[0], q.cluster_size)
    torch.testing.assert_close(state.embed_avg[0], q.embed_avg)
    assert state.keys == {"codebook": "quantizer.embed", "cluster_size": "quantizer.cluster_size",
                          "embed_avg": "quantizer.embed_avg", "initted": "quantizer.initted"}
    assert state.dtypes["initted"] == "bool"


def test_square_demo_table_stays_k_by_d():
    # K == D and no `initted`: the rosinality ([D, K]) adapter must not take it.
    model = train(CodebookAutoencoder(DemoEMAQuantizer(6, 6), 6, "quantizer"), (2, 3, 8, 8))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("initted")}
    [state] = discover(source_from_state_dict(sd))
    assert state.library == "generic"
    torch.testing.assert_close(state.codebook[0], model.quantizer.embed)


def test_transposed_table_oriented_by_count_length():
    model = trained("demo")
    sd = {"vq_layer.codebook": model.quantizer.embed.t().contiguous(),
          "vq_layer.usage": model.quantizer.cluster_size}
    [state] = discover(source_from_state_dict(sd))
    assert (state.name, state.codebook_size, state.dim) == ("vq_layer", 24, 6)
    torch.testing.assert_close(state.codebook[0], model.quantizer.embed)


def test_quantizer_named_table_without_ema_is_a_gradient_codebook():
    holder = nn.Module()
    holder.quantizer = nn.Module()
    holder.quantizer.codebook = nn.Embedding(16, 4)
    [state] = discover(source_from_state_dict(holder.state_dict()))
    assert (state.name, state.kind, state.library, state.eps) == ("quantizer.codebook", "vq", "generic", None)


@pytest.mark.parametrize("table", ["embed_tokens", "embedding", "embed", "word_embeddings"])
def test_token_embeddings_are_never_claimed(table):
    model = train(TokenModel(table), (2, 3, 8, 8), steps=1)
    with pytest.raises(NoQuantizerError) as err:
        discover(source_from_state_dict(model.state_dict()))
    assert "searched for" in str(err.value) and "generic" in str(err.value)
    assert "--quantizer" in str(err.value)


def test_explicit_prefix_reads_unusual_names():
    model = trained("demo")
    q = model.quantizer
    sd = {"enc.weight": torch.randn(6, 16), "my_vq.table": q.embed, "my_vq.hits": q.cluster_size,
          "my_vq.running_sum": q.embed_avg, "my_vq.initted": q.initted}
    src = source_from_state_dict(sd)
    # found alone as the checkpoint's only bare table, its statistics not recognised by name
    [auto] = discover(src)
    assert (auto.name, auto.kind, auto.cluster_size) == ("my_vq", "vq", None)
    [state] = discover(src, only=["my_vq"])  # named: the siblings are read
    assert (state.name, state.kind, state.library, state.initted) == ("my_vq", "vq-ema", "user", True)
    assert state.keys["cluster_size"] == "my_vq.hits" and state.keys["embed_avg"] == "my_vq.running_sum"
    torch.testing.assert_close(state.codebook[0], q.embed)


def test_a_bare_table_beside_a_layer_of_the_same_shape():
    # the neutral 'block2.table' [128, 8] sits beside a decoder layer Linear(8 -> 128) whose 128
    # outputs the next layer takes in: a hidden width equal to K, not a vocabulary head
    enc, table, dec = nn.Linear(16, 8), nn.Embedding(128, 8), nn.Sequential(nn.Linear(8, 128), nn.Linear(128, 16))
    sd = {**{f"features.{k}": v for k, v in enc.state_dict().items()}, "block2.table.weight": table.weight.data,
          **{f"dec.{k}": v for k, v in dec.state_dict().items()}}
    [state] = discover(source_from_state_dict(sd))
    assert (state.name, state.codebook_size, state.dim) == ("block2.table", 128, 8)
    # the same table with an output layer of [128, 8] + bias [128] that nothing reads after it:
    # a language model's token table and head
    lm = {"block2.table.weight": table.weight.data, "mix.weight": torch.randn(8, 8), "lm_head.weight": torch.randn(128, 8),
          "lm_head.bias": torch.randn(128)}
    with pytest.raises(NoQuantizerError):
        discover(source_from_state_dict(lm))


def test_a_bare_table_beside_its_own_optimizer_moments(tmp_path):
    # a Lightning checkpoint: Adam's exp_avg / exp_avg_sq of the table have the table's shape,
    # and are not a second [K, D] layer of the model
    enc, tok = nn.Linear(40, 16), nn.Embedding(256, 16)
    opt = torch.optim.Adam([*enc.parameters(), *tok.parameters()], 1e-3)
    tok(torch.randint(0, 256, (8,))).sum().add(enc(torch.randn(2, 40)).sum()).backward()
    opt.step()
    sd = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()}, "tok.embedding.weight": tok.weight.data}
    torch.save({"state_dict": sd, "optimizer_states": [opt.state_dict()], "epoch": 1}, tmp_path / "l.ckpt")
    [state] = discover(open_checkpoint(tmp_path / "l.ckpt"))
    assert (state.name, state.codebook_size, state.dim) == ("tok.embedding", 256, 16)


def test_explicit_heads_table():
    sd = {"rvq.embed": torch.randn(2, 8, 3), "rvq.cluster_size": torch.rand(2, 8)}
    [state] = explicit(source_from_state_dict(sd), "rvq")
    assert state.codebook.shape == (2, 8, 3) and state.cluster_size.shape == (2, 8)


def test_explicit_fsq_with_levels_reads_projection():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    holder = nn.Module()
    holder.fsq = vqp.FSQ(levels=[8, 5, 5, 5], dim=16)
    holder.fsq(torch.randn(2, 10, 16))
    [state] = discover(source_from_state_dict(holder.state_dict()), only=["fsq"], levels=[8, 5, 5, 5])
    assert (state.kind, state.library, state.levels) == ("fsq", "user", (8, 5, 5, 5))
    assert (state.codebook_size, state.dim, state.input_dim) == (1000, 4, 16)
    torch.testing.assert_close(state.project_in[0], holder.fsq.project_in.weight.detach())
    assert state.keys["project_in.weight"] == "fsq.project_in.weight"


def test_explicit_fsq_with_nothing_stored_is_noted():
    [state] = explicit(source_from_state_dict({"enc.weight": torch.randn(4, 4)}), "fsq", levels=[3, 3])
    assert state.codebook_size == 9 and any("nothing is stored" in n for n in state.notes)


def test_explicit_missing_prefix_suggests_close_ones():
    src = source_from_state_dict(trained("demo", steps=1).state_dict())
    with pytest.raises(NoQuantizerError) as err:
        explicit(src, "quantiser")
    assert "no tensors under 'quantiser'" in str(err.value) and "quantizer" in err.value.hint


def test_explicit_prefix_without_table_says_what_it_found():
    src = source_from_state_dict(trained("demo", steps=1).state_dict())
    with pytest.raises(NoQuantizerError) as err:
        explicit(src, "encoder")
    assert "encoder.weight [6, 3, 1, 1] float32" in str(err.value)
