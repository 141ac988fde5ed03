"""vector-quantize-pytorch quantizers that discovery used to miss: SimVQ with any code_transform,
FSQ when only the user knows its levels. Real modules, briefly run, saved, read back.

The SimVQ and FSQ layouts are the same in vector-quantize-pytorch 1.32.0 and 1.34.1 (their
`sim_vq.py` / `residual_sim_vq.py` are identical; FSQ stores only its projections and, with
`orthogonal_rotation`, `orthogonal_rot`); these tests run against whichever is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.cli import app
from vqdoctor.errors import NoQuantizerError
from vqdoctor.quantizers import discover

vqp = pytest.importorskip("vector_quantize_pytorch")


def save(module: nn.Module, tmp_path: Path, name: str = "quantizer", extra: dict | None = None) -> Path:
    path = tmp_path / f"{name}.pt"
    sd = {f"{name}.{k}": v for k, v in module.state_dict().items()}
    torch.save({"model": {**(extra or {}), **sd}}, path)
    return path


@pytest.mark.parametrize("transform", ["default", "linear-bias", "mlp", "identity"])
def test_simvq_is_found_with_k_from_the_frozen_codebook(tmp_path: Path, transform: str) -> None:
    torch.manual_seed(0)
    module = {"default": None, "linear-bias": nn.Linear(8, 16),
              "mlp": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16)),
              "identity": nn.Identity()}[transform]
    sim = vqp.SimVQ(dim=16 if transform != "identity" else 8, codebook_size=64, frozen_codebook_dim=8,
                    codebook_transform=module)
    sim.train()(torch.randn(2, 8, sim.frozen_codebook.shape[1] if transform == "identity" else 16))
    src = open_checkpoint(save(sim, tmp_path))
    [s] = discover(src)
    assert (s.name, s.kind, s.codebook_size) == ("quantizer", "simvq", 64)
    assert s.dim == sim.codebook.shape[1]
    # the effective codebook is code_transform(frozen_codebook), what the lookup compares with
    assert torch.allclose(s.codebook[0], sim.codebook.detach(), atol=1e-5)
    assert set(s.keys.values()) == set(src.keys())
    assert bool(s.notes) == (transform == "mlp")  # the unstored ReLU is assumed, and said


def test_named_simvq_reads_k_from_the_frozen_codebook(tmp_path: Path) -> None:
    """`--quantizer` on a SimVQ: K is the frozen codebook's rows, never a transform weight's."""
    sim = vqp.SimVQ(dim=16, codebook_size=64, frozen_codebook_dim=8,
                    codebook_transform=nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 16)))
    src = open_checkpoint(save(sim, tmp_path, extra={"encoder.weight": torch.randn(16, 4)}))
    [s] = discover(src, only=["quantizer"])
    assert (s.codebook_size, s.dim) == (64, 16)
    result = CliRunner().invoke(app, ["inspect", str(src.path), "--quantizer", "quantizer", "--format", "json"])
    assert result.exit_code in (0, 1), result.stderr
    assert '"codebook_size": 64' in result.stdout


def test_fsq_is_found_when_only_the_user_gives_levels(tmp_path: Path) -> None:
    fsq = vqp.FSQ(levels=[8, 5, 5], dim=16)
    path = save(fsq, tmp_path, name="fsq", extra={"encoder.weight": torch.randn(16, 4)})
    with pytest.raises(NoQuantizerError):
        discover(open_checkpoint(path))
    src = open_checkpoint(path)
    [s] = discover(src, levels=[8, 5, 5])
    assert (s.name, s.kind, s.codebook_size, s.dim, s.levels, s.input_dim) == ("fsq", "fsq", 200, 3, (8, 5, 5), 16)
    assert torch.equal(s.project_in[0], fsq.project_in.weight)
    result = CliRunner().invoke(app, ["inspect", str(path), "--levels", "8,5,5"])
    assert result.exit_code in (0, 1), result.stderr
    assert "fsq  fsq" in result.stdout and "levels=8,5,5" in result.stdout


def test_fsq_with_orthogonal_rotation_or_nothing_stored(tmp_path: Path) -> None:
    rot = vqp.FSQ(levels=[8, 8, 8], orthogonal_rotation=True)  # stores only orthogonal_rot [3, 3]
    [s] = discover(open_checkpoint(save(rot, tmp_path, name="q", extra={"enc.weight": torch.randn(3, 3)})),
                   levels=[8, 8, 8])
    assert (s.name, s.codebook_size, s.keys) == ("q", 512, {"orthogonal_rot": "q.orthogonal_rot"})
    # an FSQ with dim == len(levels) stores nothing: a nameless state that says so
    [s] = discover(open_checkpoint(save(nn.Linear(4, 3), tmp_path, name="enc")), levels=[8, 5, 5])
    assert (s.name, s.kind, s.codebook_size) == ("", "fsq", 200)
    assert "stores no tensor" in s.notes[0]
