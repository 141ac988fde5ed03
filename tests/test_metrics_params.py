"""Encoder / decoder movement between two checkpoints (`metrics.params`), on real trainings:
a vector-quantize-pytorch VQ-VAE whose encoder output is detached before the quantizer (the
encoder gets no gradient at all), and one whose learning rate jumps 100x after its first
checkpoint (the MultiStepLR gamma meant as 0.01 set to 100), against the same model trained
correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import vqdoctor
from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.metrics.params import param_drift, side_of

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

vqp = pytest.importorskip("vector_quantize_pytorch")


class AE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.vq = vqp.VectorQuantize(dim=16, codebook_size=64, decay=0.9, kmeans_init=True)
        self.decoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor, detach: bool) -> torch.Tensor:
        z = self.encoder(x)
        q, _, commit = self.vq((z.detach() if detach else z)[:, None])
        return nn.functional.mse_loss(self.decoder(q[:, 0]), x) + commit.sum()


def train(tmp: Path, detach: bool, spike: bool = False) -> tuple[Path, Path]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = AE()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    centres = torch.randn(32, 16, generator=g) * 2
    paths = []
    for step in range(40):
        if spike and step == 10:
            opt.param_groups[0]["lr"] = 0.3
        x = centres[torch.randint(0, 32, (512,), generator=g)] + torch.randn(512, 16, generator=g)
        opt.zero_grad()
        model(x, detach).backward()
        opt.step()
        if step in (9, 39):
            paths.append(tmp / f"{'detached' if detach else 'spike' if spike else 'healthy'}_{step}.pt")
            torch.save({"state_dict": model.state_dict(), "global_step": step}, paths[-1])
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("params")
    return {"detached": train(tmp, True), "healthy": train(tmp, False), "spike": train(tmp, False, True)}


def test_sides_from_names() -> None:
    assert side_of("model.encoder.0.weight") == "encoder"
    assert side_of("enc_b.blocks.1.bias") == "encoder"
    assert side_of("quant_conv.weight") == "encoder"
    assert side_of("post_quant_conv.weight") == "decoder"
    assert side_of("dec.0.weight") == "decoder"
    assert side_of("quantize.embedding.weight") is None
    assert side_of("encoder") is None  # the last component is the tensor's own name


def test_detached_encoder_reads_unchanged(runs) -> None:
    early, late = (open_checkpoint(p) for p in runs["detached"])
    m = param_drift(early, late, ["vq"])
    assert m["encoder_unchanged_fraction"] == 1.0 and m["encoder_tensors"] == 4
    assert m["decoder_unchanged_fraction"] == 0.0 and m["decoder_tensors"] == 4
    early, late = (open_checkpoint(p) for p in runs["healthy"])
    assert param_drift(early, late, ["vq"])["encoder_unchanged_fraction"] == 0.0


def test_file_order_decides_without_names(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(8, 4), nn.Linear(4, 4))
    torch.save(model.state_dict(), a := tmp_path / "a.pt")
    with torch.no_grad():
        model[2].weight.add_(1.0)
    torch.save(model.state_dict(), b := tmp_path / "b.pt")
    m = param_drift(open_checkpoint(a), open_checkpoint(b), ["1"])
    assert (m["encoder_unchanged_fraction"], m["decoder_unchanged_fraction"]) == (1.0, 4 / 20)
    assert m["encoder_tensors"] == 2


def test_inspect_names_the_encoder_that_did_not_move(runs) -> None:
    report = vqdoctor.inspect(list(runs["detached"]))
    d = report.diagnosis
    assert d is not None and d.id == "no-encoder-gradient", [f.id for f in report.findings]
    assert d.quantizer is None and d.evidence["encoder_tensors"] == 4
    healthy = vqdoctor.inspect(list(runs["healthy"]))
    assert "no-encoder-gradient" not in {f.id for f in healthy.findings}
    # one checkpoint: nothing to compare, no claim
    assert "no-encoder-gradient" not in {f.id for f in vqdoctor.inspect(runs["detached"][1]).findings}


def test_weight_growth_after_a_learning_rate_jump(runs) -> None:
    growth = {name: param_drift(*(open_checkpoint(p) for p in runs[name]), ["vq"]) for name in ("healthy", "spike")}
    assert growth["healthy"]["encoder_norm_growth"] < 1.5 and growth["healthy"]["decoder_norm_growth"] < 1.5
    assert max(growth["spike"]["encoder_norm_growth"], growth["spike"]["decoder_norm_growth"]) >= 5
    report = vqdoctor.inspect(list(runs["spike"]))
    assert report.diagnosis is not None and report.diagnosis.id == "loss-divergence", [f.id for f in report.findings]
    assert "loss-divergence" not in {f.id for f in vqdoctor.inspect(list(runs["healthy"])).findings}
