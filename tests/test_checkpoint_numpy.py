"""numpy values in checkpoints: read by the safe loader, scoped to its call, and no way in for code.

Older repositories' save helpers put numpy scalars and arrays beside the weights; torch's
weights-only loader refuses them unless their globals are allow-listed. vqdoctor allows numpy's
arrays, dtypes and scalars for its own `torch.load` call only (`vqdoctor.checkpoint.numpy_safe`),
so these files read without `--trust-checkpoint`, while pickles that use numpy to smuggle a
payload (`numpy.load` with `allow_pickle`, `_reconstruct` of a foreign type, object arrays of
payloads, arrays declaring terabytes) run nothing and get one line.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hostile_inputs import Payload, lucidrains_state, numpy_payload_pickle, torch_zip
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.errors import CheckpointError, MemoryBudgetError, UnsafeCheckpointError
from vqdoctor.quantizers import discover

pytest.importorskip("vector_quantize_pytorch")


def _save_helper_checkpoint() -> dict:
    """What an older training script's `save_checkpoint` writes."""
    return {"model": lucidrains_state(), "epoch": np.int64(3), "loss": np.float32(0.25),
            "stats": np.array([1.0, 2.0, 3.0]), "rng": np.random.get_state(),
            "dtype": np.dtype("float16"), "names": np.array(["a", "bc"]),
            "hparams": {"lr": np.float64(3e-4), "levels": np.array([8, 5, 5])}}


@pytest.mark.parametrize("legacy", [False, True])
def test_numpy_values_load_without_trust(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(_save_helper_checkpoint(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError):  # torch alone refuses the file
        torch.load(path, weights_only=True)
    src = open_checkpoint(path)
    assert src.safe_load and src.meta["epoch"] == 3
    assert src.meta["config"] == {"lr": 3e-4, "levels": [8, 5, 5]}  # numpy -> plain Python
    [q] = discover(src)
    assert q.name == "vq" and q.codebook_size == 64


def test_the_allowlist_is_scoped_to_our_load(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.randn(3), "step": np.int64(7)}, path)
    before = list(torch.serialization.get_safe_globals())
    assert open_checkpoint(path).meta["global_step"] == 7
    assert list(torch.serialization.get_safe_globals()) == before
    # still refused by a plain weights-only load, unless another library already allowed numpy
    # process-wide (transformers' Trainer and accelerate do, with add_safe_globals)
    if not any("numpy" in str(g) for g in before):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)


def _u(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _long(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _in_dict(value: bytes) -> bytes:
    return b"\x80\x02}" + _u("a") + value + b"s."


def test_numpy_payloads_run_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # passed explicitly: no effect
    marker = tmp_path / "side-effect"
    path = tmp_path / "smuggle.pt"
    torch_zip(path, numpy_payload_pickle(marker))  # numpy.load(allow_pickle) + _reconstruct(exec)
    with pytest.raises(UnsafeCheckpointError) as err:
        open_checkpoint(path)
    assert {"numpy.load", "builtins.exec"} <= set(err.value.globals)
    assert "\n" not in str(err.value)
    # an object array whose element is a payload: the element's callable is refused
    obj = tmp_path / "object-array.pt"
    torch.save({"w": torch.randn(2), "extra": np.array([Payload(marker)], dtype=object)}, obj)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        open_checkpoint(obj)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["reconstruct-shape", "newobj-shape"])
def test_numpy_arrays_declaring_terabytes_are_refused_before_allocation(tmp_path: Path, how: str) -> None:
    shape = _long(10**12) + b"\x85"
    if how == "reconstruct-shape":  # numpy's own _reconstruct with a huge shape
        value = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + shape + _u("b") + b"\x87R"
    else:  # ndarray.__new__ through NEWOBJ (allowed classes may be instantiated)
        value = b"cnumpy\nndarray\n" + shape + _u("f8") + b"\x86\x81"
    path = tmp_path / "huge.pt"
    torch_zip(path, _in_dict(value))
    with pytest.raises(MemoryBudgetError) as err:
        open_checkpoint(path)
    assert "memory budget" in str(err.value) and "--max-memory" in str(err.value)


def test_reconstruct_of_another_allowed_type_is_refused(tmp_path: Path) -> None:
    """`_reconstruct(subtype, ...)` only builds numpy arrays, whatever allowed class is passed."""
    value = b"cnumpy.core.multiarray\n_reconstruct\nccollections\nOrderedDict\nK\x00\x85" + _u("b") + b"\x87R"
    path = tmp_path / "subtype.pt"
    torch_zip(path, _in_dict(value))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert "not allowed" in str(err.value) and "\n" not in str(err.value)
