"""Probe conventions through `vqdoctor inspect`: dict entries matched by shape, `FILE:KEY`, budgets.

A real vector-quantize-pytorch `VectorQuantize` with an input projection (dim 16 -> codebook
dim 4) is trained for a few steps and saved; probes are its real encoder outputs and their
projections, keyed the way user scripts key them (`z_e`, `z_proj`, labels beside them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqdoctor.cli import app
from vqdoctor.errors import ProbeError
from vqdoctor.metrics.probe import load_probe, read_probe

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=16, codebook_size=32, codebook_dim=4, decay=0.8, kmeans_init=True)
    z = torch.randn(2, 256, 16)
    for _ in range(3):
        vq(z)
    folder = tmp_path_factory.mktemp("probe")
    ckpt = folder / "vq.pt"
    torch.save({f"vq.{k}": v for k, v in vq.state_dict().items()}, ckpt)
    with torch.no_grad():
        projected = vq.project_in(z)
    return {"folder": folder, "ckpt": str(ckpt), "z": z, "projected": projected}


def inspect(*args: str) -> Any:
    result = CliRunner().invoke(app, ["inspect", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def as_json(result: Any) -> dict[str, Any]:
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_entries_are_matched_by_shape_and_the_entry_is_said(run: dict[str, Any]) -> None:
    probe = run["folder"] / "side_by_side.pt"
    torch.save({"z_e": run["z"], "z_proj": run["projected"], "labels": torch.arange(512)}, probe)
    data = as_json(inspect(run["ckpt"], "--probe", str(probe), "--format", "json"))
    assert data["source"]["probe_entries"] == {"vq": "z_e"}  # the input dim wins over the projected one
    [q] = data["quantizers"]
    assert q["metrics"]["probe_tokens"] == 512
    assert any("entry 'z_e' [2, 256, 16]" in n and "input dim" in n for n in q["notes"])
    text = inspect(run["ckpt"], "--probe", str(probe))
    assert f"probe {probe} (entry z_e)" in " ".join(text.stdout.split())


def test_a_projected_entry_is_used_in_code_space(run: dict[str, Any]) -> None:
    probe = run["folder"] / "projected.pt"
    torch.save({"z_proj": run["projected"], "indices": torch.zeros(2, 256, dtype=torch.long)}, probe)
    data = as_json(inspect(run["ckpt"], "--probe", str(probe), "--format", "json"))
    assert data["source"]["probe_entries"] == {"vq": "z_proj"}
    [q] = data["quantizers"]
    assert any("code-space dim after its project_in, 4" in n for n in q["notes"])
    # the same vectors as when the encoder output is given: one projection, applied once
    raw = run["folder"] / "raw.pt"
    torch.save(run["z"], raw)
    ref = as_json(inspect(run["ckpt"], "--probe", str(raw), "--format", "json"))["quantizers"][0]
    assert q["metrics"]["probe_perplexity"] == pytest.approx(ref["metrics"]["probe_perplexity"], rel=1e-5)


def test_only_true_ambiguity_is_refused_and_file_key_chooses(run: dict[str, Any]) -> None:
    probe = run["folder"] / "two.pt"
    torch.save({"before_norm": run["z"], "after_norm": run["z"] * 2}, probe)
    result = inspect(run["ckpt"], "--probe", str(probe))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "'before_norm' [2, 256, 16], 'after_norm' [2, 256, 16] all fit quantizer 'vq'" in line
    assert f"--probe {probe}:KEY" in line and "('vq')" in line
    data = as_json(inspect(run["ckpt"], "--probe", f"{probe}:after_norm", "--format", "json"))
    assert data["source"]["probe"] == f"{probe}:after_norm"
    assert data["source"]["probe_entries"] == {"vq": "after_norm"}
    missing = inspect(run["ckpt"], "--probe", f"{probe}:nope")
    assert missing.exit_code == 2 and "has no entry 'nope' (entries: before_norm, after_norm)" in missing.stderr


@pytest.mark.parametrize("fmt", ["pt", "npy", "safetensors"])
def test_a_probe_over_the_budget_is_sampled_with_a_note(run: dict[str, Any], fmt: str) -> None:
    z = run["z"].reshape(-1, 16).repeat(8, 1)  # 4096 x 16 float32 = 256 KiB
    probe = run["folder"] / f"big.{fmt}"
    if fmt == "pt":
        torch.save(z, probe)
    elif fmt == "npy":
        np.save(probe, z.numpy())
    else:
        from safetensors.torch import save_file
        save_file({"z": z.contiguous()}, str(probe))
    loaded = read_probe(str(probe), max_memory="64KiB")
    assert 900 <= loaded.value.shape[0] <= 1024 and loaded.notes
    data = as_json(inspect(run["ckpt"], "--probe", str(probe), "--max-memory", "64KiB", "--format", "json"))
    [q] = data["quantizers"]
    assert q["metrics"]["probe_tokens"] == loaded.value.shape[0]
    assert any("evenly spread blocks" in n and "--max-memory" in n for n in q["notes"])
    full = as_json(inspect(run["ckpt"], "--probe", str(probe), "--format", "json"))["quantizers"][0]
    assert full["metrics"]["probe_tokens"] == 4096


def test_probe_shapes_that_are_not_vectors(tmp_path: Path) -> None:
    cases = {"scalar.pt": torch.tensor(1.0), "meta.pt": torch.empty(4, 8, device="meta"),
             "sparse.pt": torch.eye(4).to_sparse()}
    for name, value in cases.items():
        torch.save(value, tmp_path / name)
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    for name, fragment in [("scalar.pt", "0-dim scalar"), ("meta.pt", "meta tensor"),
                           ("sparse.pt", "sparse_coo tensor"), ("text.npy", "expected a numeric array")]:
        with pytest.raises(ProbeError, match=fragment) as err:
            load_probe(str(tmp_path / name))
        assert "\n" not in str(err.value)
