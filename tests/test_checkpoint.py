"""Safe checkpoint readers on real files written by torch.save and safetensors."""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import sys
import threading
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from vqdoctor.checkpoint import OPTIMIZER_PREFIX, open_checkpoint
from vqdoctor.errors import CheckpointError, InputError, UnsafeCheckpointError


class Payload:
    """Pickles to a call that creates a marker file: proof of code execution if it ever exists."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def vq_state() -> dict[str, torch.Tensor]:
    """A lucidrains-style VQ-EMA state dict, small."""
    return {
        "encoder.weight": torch.randn(8, 4),
        "quantizer._codebook.embed": torch.randn(1, 16, 8),
        "quantizer._codebook.cluster_size": torch.rand(1, 16),
        "quantizer._codebook.embed_avg": torch.randn(1, 16, 8),
        "quantizer._codebook.initted": torch.tensor(True),
    }


def save(tmp_path, obj, name="ckpt.pt", legacy=False, **kw) -> str:
    p = str(tmp_path / name)
    torch.save(obj, p, _use_new_zipfile_serialization=not legacy, **kw)
    return p


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("legacy, fmt", [(False, "torch-zip"), (True, "torch-legacy")])
def test_raw_state_dict_both_torch_formats(tmp_path, legacy, fmt):
    sd = vq_state()
    src = open_checkpoint(save(tmp_path, sd, legacy=legacy))
    assert src.format == fmt and src.safe_load and src.container == ""
    assert src.keys() == list(sd)
    for k, t in sd.items():
        assert src.infos[k].shape == tuple(t.shape) and src.infos[k].dtype == t.dtype
        assert torch.equal(src.get(k), t)
    assert src.infos["quantizer._codebook.initted"].shape == ()


def test_format_is_told_by_content_not_extension(tmp_path):
    sd = vq_state()
    zip_named_safetensors = save(tmp_path, sd, name="weights.safetensors")
    st_named_pt = str(tmp_path / "weights.pt")
    save_file(sd, st_named_pt)
    legacy_named_json = save(tmp_path, sd, name="model.json", legacy=True)
    assert open_checkpoint(zip_named_safetensors).format == "torch-zip"
    assert open_checkpoint(st_named_pt).format == "safetensors"
    assert open_checkpoint(legacy_named_json).format == "torch-legacy"
    assert torch.equal(open_checkpoint(zip_named_safetensors).get("encoder.weight"),
                       sd["encoder.weight"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux mmap semantics")
@pytest.mark.parametrize("kind", ["torch-zip", "safetensors"])
def test_open_reads_no_tensor_data(tmp_path, kind):
    # The file's bytes for one tensor are rewritten *after* opening: a reader that copied data at
    # open time returns the old values, a memory-mapped / lazy one the new ones.
    sd = {"a": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3)}
    p = str(tmp_path / "f.bin")
    torch.save(sd, p) if kind == "torch-zip" else save_file(sd, p)
    src = open_checkpoint(p)
    assert src.format == kind
    data = open(p, "rb").read()
    offset = data.find(sd["a"].numpy().tobytes())
    assert offset > 0
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(torch.full((4096,), 7.0).numpy().tobytes())
    assert torch.equal(src.get("a"), torch.full((4096,), 7.0))


def test_safetensors_header_only_and_per_tensor_loads(tmp_path):
    sd = {f"blocks.{i}.weight": torch.randn(32, 32) for i in range(12)}
    sd["quantizer.codebook.weight"] = torch.randn(64, 8).to(torch.bfloat16)
    p = str(tmp_path / "m.safetensors")
    save_file(sd, p, metadata={"format": "pt", "step": "12"})
    src = open_checkpoint(p)
    calls: list[str] = []
    inner = src.loader
    src.loader = lambda k: calls.append(k) or inner(k)
    assert src.meta["metadata"] == {"format": "pt", "step": "12"}
    assert src.infos["quantizer.codebook.weight"].dtype == torch.bfloat16
    assert src.infos["quantizer.codebook.weight"].shape == (64, 8)
    # names in natural order: blocks.2 before blocks.10
    assert src.keys().index("blocks.2.weight") < src.keys().index("blocks.10.weight")
    assert calls == []
    t = src.get_float("quantizer.codebook.weight")
    assert calls == ["quantizer.codebook.weight"]
    assert torch.equal(t, sd["quantizer.codebook.weight"].float())


def test_safetensors_with_ddp_prefix_is_stripped(tmp_path):
    model = torch.nn.Linear(3, 2)
    p = str(tmp_path / "ddp.safetensors")
    save_file(torch.nn.DataParallel(model).state_dict(), p)
    src = open_checkpoint(p)
    assert src.keys() == ["bias", "weight"]  # safetensors lists names sorted
    assert torch.equal(src.get("weight"), model.weight.detach())


# ---------------------------------------------------------------------------- containers


def test_lightning_checkpoint_with_real_adam_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    codebook = torch.nn.Parameter(torch.randn(32, 4))
    params = [*model.parameters(), codebook]
    opt = torch.optim.Adam(params, lr=1e-3)
    (model(torch.randn(5, 8)) @ codebook.T).pow(2).mean().backward()
    opt.step()
    state_dict = {f"model.net.{k}": v for k, v in model.state_dict().items()}
    state_dict["model.quantizer.embedding.weight"] = codebook.detach()
    ckpt = {"state_dict": state_dict, "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [], "global_step": 1, "epoch": 0,
            "hyper_parameters": {"lr": 1e-3, "codebook_size": 32, "betas": (0.9, 0.99)},
            "pytorch-lightning_version": "2.4.0", "loops": {"fit_loop": {"x": torch.ones(2)}}}
    src = open_checkpoint(save(tmp_path, ckpt, name="last.ckpt"))
    assert src.container == "state_dict"
    assert src.keys() == list(state_dict)  # loops / optimizer tensors are not weights
    assert src.meta["global_step"] == 1 and src.meta["epoch"] == 0
    assert src.meta["config"] == {"lr": 1e-3, "codebook_size": 32, "betas": [0.9, 0.99]}
    entries = src.meta["optimizer"]
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4] and {e["opt"] for e in entries} == {0}
    cb = entries[4]
    assert cb["shape"] == (32, 4) and set(cb["keys"]) == {"exp_avg", "exp_avg_sq"}
    assert cb["keys"]["exp_avg"] == f"{OPTIMIZER_PREFIX}0/4/exp_avg"
    assert torch.equal(src.get(cb["keys"]["exp_avg_sq"]), opt.state[codebook]["exp_avg_sq"])
    assert src.infos[cb["keys"]["exp_avg"]].shape == (32, 4)
    assert not any(k.endswith("/step") for k in src.infos)  # scalar step counters skipped


def test_optimizer_dict_forms_and_param_names(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.named_parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    sgd.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "opt": sgd.state_dict(),
            "step": 7}
    src = open_checkpoint(save(tmp_path, ckpt))
    by_opt = {(e["opt"], e["index"]): e for e in src.meta["optimizer"]}
    assert by_opt[(0, 0)]["name"] == "weight" and by_opt[(0, 0)]["shape"] == (3, 4)
    assert set(by_opt[(1, 0)]["keys"]) == {"momentum_buffer"}
    assert src.meta["global_step"] == 7


@pytest.mark.parametrize("wrap, container", [
    (lambda sd: {"model": sd, "note": "hi", "extra": {"k": 1}}, "model"),
    (lambda sd: {"model_state_dict": sd, "epoch": 3}, "model_state_dict"),
    (lambda sd: {"state_dict": {"model": sd}}, "state_dict.model"),
    (lambda sd: {"best_state": {"model": sd}, "xp.cfg": "a: 1"}, "best_state.model"),
    (lambda sd: {"model": sd, "loss": torch.tensor(1.5)}, "model"),
])
def test_containers_unwrap(tmp_path, wrap, container):
    sd = vq_state()
    src = open_checkpoint(save(tmp_path, wrap(sd)))
    assert src.container == container
    assert src.keys() == list(sd)
    assert torch.equal(src.get("quantizer._codebook.embed"), sd["quantizer._codebook.embed"])


def test_nested_dicts_flatten_and_non_tensor_leaves_are_skipped(tmp_path):
    ckpt = {"encoder": {"weight": torch.ones(2, 2), "meta": "x"},
            "quantizer": {"codebook": torch.zeros(4, 2), "decay": 0.99, "names": ["a"]}, "step": 3}
    src = open_checkpoint(save(tmp_path, ckpt))
    assert src.keys() == ["encoder.weight", "quantizer.codebook"]
    assert src.meta["global_step"] == 3


def test_ema_copies_are_recorded_and_selectable(tmp_path):
    main, ema = vq_state(), {k: v + 1 for k, v in vq_state().items()}
    # timm's ModelEmaV2 keeps the copy under `.module`, so its keys carry a `module.` prefix.
    ema_timm = {f"module.{k}": v for k, v in ema.items()}
    p = save(tmp_path, {"state_dict": main, "state_dict_ema": ema_timm, "epoch": 2})
    src = open_checkpoint(p)
    assert src.container == "state_dict" and src.meta["containers"] == ["state_dict_ema"]
    picked = open_checkpoint(p, container="ema")
    assert picked.container == "state_dict_ema" and picked.keys() == list(main)
    assert torch.equal(picked.get("encoder.weight"), ema["encoder.weight"])
    assert open_checkpoint(p, container="state_dict_ema").keys() == list(main)
    with pytest.raises(InputError) as e:
        open_checkpoint(p, container="swa")
    assert_one_line(e, p, "'swa'", "state_dict", "state_dict_ema")


def test_ema_only_checkpoint_and_audiocraft_ema_nesting(tmp_path):
    sd = vq_state()
    assert open_checkpoint(save(tmp_path, {"model_ema": sd}, name="a.pt")).container == "model_ema"
    src = open_checkpoint(save(tmp_path, {"model": sd, "ema": {"state": {"model": sd}}}, name="b.pt"),
                          container="ema")
    assert src.container == "ema.state.model" and src.keys() == list(sd)


def test_container_on_flat_files_is_an_input_error(tmp_path):
    p = save(tmp_path, vq_state())
    with pytest.raises(InputError) as e:
        open_checkpoint(p, container="ema")
    assert_one_line(e, "no container 'ema'", "none")
    st = str(tmp_path / "m.safetensors")
    save_file(vq_state(), st)
    with pytest.raises(InputError):
        open_checkpoint(st, container="ema")


def test_ddp_and_compile_prefixes_from_real_wrappers(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    plain = list(model.state_dict())

    class WithCompiledPart(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.compile(model)  # constructing is enough: no compilation runs

    cases = {
        "compile": torch.compile(model).state_dict(),
        "ddp": torch.nn.DataParallel(model).state_dict(),
        "ddp_compile": torch.nn.DataParallel(torch.compile(model)).state_dict(),
        "compile_ddp": torch.compile(torch.nn.DataParallel(model)).state_dict(),
        "lightning": {"state_dict": torch.nn.DataParallel(torch.compile(model)).state_dict()},
    }
    assert list(cases["ddp_compile"])[0] == "module._orig_mod.0.weight"
    for name, obj in cases.items():
        assert open_checkpoint(save(tmp_path, obj, name=f"{name}.pt")).keys() == plain, name
    sub = open_checkpoint(save(tmp_path, WithCompiledPart().state_dict(), name="sub.pt"))
    assert sub.keys() == [f"body.{k}" for k in plain]


def test_module_prefix_kept_when_not_a_wrapper(tmp_path):
    # Only some keys start with module.: a submodule really named `module`, not DDP.
    sd = {"module.weight": torch.ones(2), "head.weight": torch.ones(2)}
    assert open_checkpoint(save(tmp_path, sd)).keys() == list(sd)
    # Stripping would make two names collide: names stay as stored.
    clash = {"module.w": torch.ones(1), "module._orig_mod.w": torch.zeros(1)}
    assert open_checkpoint(save(tmp_path, clash, name="c.pt")).keys() == list(clash)


# ---------------------------------------------------------------------------- safety


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("force_env", [False, True])
def test_malicious_pickle_never_runs(tmp_path, monkeypatch, legacy, force_env):
    if force_env:
        # Must not be able to switch the safe loader off: weights_only is passed explicitly.
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    p = save(tmp_path, {"w": torch.ones(2), "x": Payload(str(marker))}, legacy=legacy)
    with pytest.raises(UnsafeCheckpointError) as e:
        open_checkpoint(p)
    assert not marker.exists()
    assert_one_line(e, p, "open", "--trust-checkpoint")
    assert any(g.endswith("open") for g in e.value.globals)


def test_malicious_pickle_protocol_4_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = save(tmp_path, {"x": Payload(str(marker))}, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError) as e:
        open_checkpoint(p)
    assert not marker.exists()
    assert_one_line(e, p, "weights-only", "--trust-checkpoint")


def test_unknown_globals_are_named_and_trust_loads_them(tmp_path):
    sd = vq_state()
    ns = argparse.Namespace(codebook_size=16, decay=0.99)
    p = save(tmp_path, {"model": sd, "args": ns, "epoch": 4})
    with pytest.raises(UnsafeCheckpointError) as e:
        open_checkpoint(p)
    assert e.value.globals == ["argparse.Namespace"]
    assert_one_line(e, "argparse.Namespace", "--trust-checkpoint")
    with pytest.warns(UserWarning, match="weights_only=False"):
        src = open_checkpoint(p, trust=True)
    assert not src.safe_load and src.keys() == list(sd)
    assert src.meta["config"] == {"codebook_size": 16, "decay": 0.99} and src.meta["epoch"] == 4


def test_torchscript_archive(tmp_path):
    p = str(tmp_path / "ts.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), p)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert_one_line(e, "TorchScript", "--trust-checkpoint")
    with pytest.warns(UserWarning):
        assert open_checkpoint(p, trust=True).keys() == ["weight", "bias"]


# ---------------------------------------------------------------------------- bad input


def write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_missing_path(tmp_path):
    p = str(tmp_path / "nope.pt")
    with pytest.raises(InputError) as e:
        open_checkpoint(p)
    assert_one_line(e, p, "no such file")


def test_empty_file(tmp_path):
    p = write(tmp_path, "empty.pt", b"")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert_one_line(e, p, "empty (0 bytes)")


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_zip(tmp_path, cut):
    full = open(save(tmp_path, vq_state()), "rb").read()
    p = write(tmp_path, "cut.pt", full[: int(len(full) * cut)])
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert_one_line(e, p, "truncated or corrupt torch zip")


def test_truncated_legacy(tmp_path):
    full = open(save(tmp_path, vq_state(), legacy=True), "rb").read()
    for n, cut in enumerate((len(full) // 2, 60)):
        p = write(tmp_path, f"cut{n}.pt", full[:cut])
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(p)
        assert_one_line(e, p, "truncated")


def test_random_bytes(tmp_path):
    p = write(tmp_path, "noise.pt", bytes(range(256)) * 64)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert_one_line(e, p, "not a checkpoint", "unrecognised")


def test_json_and_text_files(tmp_path):
    j = write(tmp_path, "config.pt", b'{"model_type": "dac", "hidden_size": {"a": 1}}')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(j)
    assert_one_line(e, j, "is JSON, not a checkpoint")
    t = write(tmp_path, "notes.ckpt", "epoch 3: loss 0.1 — ok\n".encode() * 10)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(t)
    assert_one_line(e, t, "is a text file")


def test_plain_pickle_and_plain_zip(tmp_path):
    p = write(tmp_path, "x.pkl", pickle.dumps({"a": [1, 2]}))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert_one_line(e, p, "plain Python pickle")
    z = str(tmp_path / "a.zip")
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(z)
    assert_one_line(e, z, "zip archive but not a torch.save checkpoint")


def test_no_tensors(tmp_path):
    p = save(tmp_path, {"epoch": 3, "config": {"lr": 0.1}})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert_one_line(e, p, "holds no tensors")
    q = save(tmp_path, [torch.ones(2)], name="list.pt")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(q)
    assert_one_line(e, q, "holds a list")


def test_corrupt_safetensors(tmp_path):
    good = str(tmp_path / "g.safetensors")
    save_file({"a": torch.zeros(3, 4)}, good)
    data = open(good, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8: 8 + n]
    bad_shape = write(tmp_path, "shape.safetensors",
                      data[:8] + header.replace(b"[3,4]", b"[9,4]") + data[8 + n:])
    bad_json = write(tmp_path, "json.safetensors", data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    short = write(tmp_path, "short.safetensors", data[: 8 + n // 2])
    huge = write(tmp_path, "huge.safetensors", struct.pack("<Q", 200_000_000) + b'{"a":1}')
    for p, frag in [(bad_shape, "corrupt safetensors header"), (bad_json, "corrupt safetensors header"),
                    (short, "truncated safetensors"), (huge, "exceeds the 100 MB limit")]:
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(p)
        assert_one_line(e, p, frag)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "dac"}')
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path))
    assert_one_line(e, str(tmp_path), "without model weights", "model.safetensors", "*.pt")


def test_directory_with_several_weights_files(tmp_path):
    for n in ("a.pt", "b.pt"):
        save(tmp_path, vq_state(), name=n)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path))
    assert_one_line(e, "2 weights files", "a.pt", "pass one")


def test_directory_with_one_weights_file(tmp_path):
    save(tmp_path, {"state_dict": vq_state()}, name="epoch=3.ckpt")
    (tmp_path / "notes.txt").write_text("x")
    src = open_checkpoint(str(tmp_path))
    assert src.path == str(tmp_path) and src.format == "torch-zip" and src.container == "state_dict"


def test_fifo_does_not_block(tmp_path):
    fifo = str(tmp_path / "pipe.pt")
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(result, fifo), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): unblock it, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("open_checkpoint blocked on a FIFO")
    assert isinstance(result[0], CheckpointError)
    assert "not a regular file" in str(result[0]) and "\n" not in str(result[0])


def _capture(out: list, path: str) -> None:
    try:
        open_checkpoint(path)
    except BaseException as e:
        out.append(e)


def test_device_file_is_refused():
    with pytest.raises(CheckpointError) as e:
        open_checkpoint("/dev/zero")
    assert_one_line(e, "/dev/zero", "not a regular file")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permission_denied(tmp_path):
    p = save(tmp_path, vq_state())
    os.chmod(p, 0)
    try:
        try:
            open(p, "rb").close()
            pytest.skip("this user reads mode-000 files (root with CAP_DAC_OVERRIDE)")
        except PermissionError:
            pass
        with pytest.raises(InputError) as e:
            open_checkpoint(p)
        assert_one_line(e, p, "permission denied")
    finally:
        os.chmod(p, 0o600)


def test_index_json_problems(tmp_path):
    missing = write(tmp_path, "a.index.json", b'{"weight_map": {"w": "model-1.safetensors"}}')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(missing)
    assert_one_line(e, missing, "names shard model-1.safetensors, which does not exist")
    escape = write(tmp_path, "b.index.json", b'{"weight_map": {"w": "../../etc/passwd"}}')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(escape)
    assert_one_line(e, escape, "outside its folder")
