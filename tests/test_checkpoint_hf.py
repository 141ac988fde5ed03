"""Hugging Face model folders written by a real transformers model's `save_pretrained`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vqdoctor.checkpoint import open_checkpoint

transformers = pytest.importorskip("transformers")

CODEBOOK = "quantizer.quantizers.0.codebook.weight"


@pytest.fixture(scope="module")
def dac():
    config = transformers.DacConfig(
        n_codebooks=2, codebook_size=64, codebook_dim=8, hidden_size=32, encoder_hidden_size=8,
        decoder_hidden_size=16, downsampling_ratios=[2, 2], upsampling_ratios=[2, 2])
    torch.manual_seed(0)
    model = transformers.DacModel(config).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(src, state):
    assert set(src.keys()) == set(state)
    for k, t in state.items():
        assert src.infos[k].shape == tuple(t.shape) and src.infos[k].dtype == t.dtype, k
    assert torch.equal(src.get(CODEBOOK), state[CODEBOOK])


def test_save_pretrained_folder(tmp_path, dac):
    model, state = dac
    model.save_pretrained(tmp_path)
    src = open_checkpoint(str(tmp_path))
    assert src.format == "hf-folder" and src.safe_load and src.path == str(tmp_path)
    assert src.meta["weights_file"] == "model.safetensors"
    assert src.meta["config"]["model_type"] == "dac" and src.meta["config"]["codebook_size"] == 64
    assert src.infos[CODEBOOK].shape == (64, 8)
    assert_same(src, state)


def test_sharded_save_pretrained_folder_and_index(tmp_path, dac):
    model, state = dac
    # transformers 5 always writes safetensors (no safe_serialization switch); a small shard
    # size gives several shards and a model.safetensors.index.json.
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert len(shards) > 1
    src = open_checkpoint(str(tmp_path))
    assert src.format == "hf-folder" and src.meta["weights_file"] == "model.safetensors.index.json"
    assert_same(src, state)
    index = open_checkpoint(str(tmp_path / "model.safetensors.index.json"))
    assert index.format == "safetensors-sharded" and "config" not in index.meta
    assert_same(index, state)


def test_pytorch_model_bin_folder_and_bin_shards(tmp_path, dac):
    # The layout older transformers wrote with safe_serialization=False: pytorch_model.bin, or
    # pytorch_model-0000N-of-0000M.bin shards with pytorch_model.bin.index.json.
    model, state = dac
    model.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    src = open_checkpoint(str(tmp_path))
    assert src.format == "hf-folder" and src.meta["weights_file"] == "pytorch_model.bin"
    assert_same(src, state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = open_checkpoint(str(sharded))
    assert src.meta["weights_file"] == "pytorch_model.bin.index.json"
    assert open_checkpoint(str(sharded / "pytorch_model.bin.index.json")).format == "torch-sharded"
    assert_same(src, state)
