"""End to end: real VQ libraries, trained briefly into healthy and pathological states, saved in
their real layouts and containers, diagnosed by `vqdoctor.inspect` (and the CLI for a few).

No mocks and no hand-written tensors: every codebook comes out of the library's own module
(vector-quantize-pytorch, encodec `core_vq`, diffusers, transformers) or, for libraries that
cannot be installed (rosinality, zalando, taming), out of the faithful re-implementations in
`tests/fixtures/reference_quantizers.py`, updated by its own EMA or optimizer. Each scenario's
docstring names the numerical mechanism it reproduces (a section of
docs/ema-and-layouts.md#how-codebooks-break-numerically) and the numbers it produced when written,
so a change in a library shows up as a changed number, not a mystery.

Trained states are module-scoped fixtures: each is built once, whatever number of tests read it.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import vqdoctor
from tests.fixtures.reference_quantizers import Quantize, VectorQuantizer2, VectorQuantizerEMA
from tests.libs import LUCIDRAINS_ZERO_INIT, encodec_core_vq
from vqdoctor.cli import app
from vqdoctor.results.model import Report

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

Paths = dict[str, Any]


# --- heavy imports, once per module ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lib() -> types.SimpleNamespace:
    """The real libraries (diffusers first: transformers then comes almost for free)."""
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    vqp = pytest.importorskip("vector_quantize_pytorch")
    return types.SimpleNamespace(
        VectorQuantize=vqp.VectorQuantize, ResidualVQ=vqp.ResidualVQ, core_vq=encodec_core_vq(),
        DiffusersVectorQuantizer=vae.VectorQuantizer, VQModel=diffusers.VQModel,
        DacConfig=transformers.DacConfig, DacModel=transformers.DacModel,
        EncodecConfig=transformers.EncodecConfig, EncodecModel=transformers.EncodecModel)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


# --- data and containers ---------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    torch.manual_seed(seed)  # the libraries' own initialisers use the global generator
    return torch.Generator().manual_seed(seed)


def mixture(g: torch.Generator, n_clusters: int = 32, dim: int = 16,
            spread: float = 2.0) -> Callable[[int], torch.Tensor]:
    """Unit-noise Gaussian clusters around `spread`-scaled random centres: n -> [n, dim]."""
    centres = torch.randn(n_clusters, dim, generator=g) * spread

    def sample(n: int) -> torch.Tensor:
        return centres[torch.randint(0, n_clusters, (n,), generator=g)] + torch.randn(n, dim, generator=g)

    return sample


def subspace(g: torch.Generator, dim: int, rank: int) -> Callable[[int], torch.Tensor]:
    """Vectors on a random `rank`-dimensional subspace of R^dim, unit scale per direction."""
    basis = torch.randn(rank, dim, generator=g)
    return lambda n: torch.randn(n, rank, generator=g) @ basis


def prefixed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def lightning(model: nn.Module, opt: torch.optim.Optimizer, step: int, path: Path) -> Path:
    """A PyTorch Lightning checkpoint of a LightningModule holding `model` as `self.model`."""
    torch.save({"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.4.0",
                "state_dict": prefixed(model, "model."), "optimizer_states": [opt.state_dict()],
                "lr_schedulers": [], "hyper_parameters": {"lr": 1e-3}}, path)
    return path


def inspect(*paths: Path, probe: Path | None = None) -> Report:
    return vqdoctor.inspect([str(p) for p in paths], probe=None if probe is None else str(probe))


def ids(report: Report) -> list[tuple[str, str | None]]:
    return [(f.id, f.quantizer) for f in report.findings]


def assert_healthy(report: Report) -> None:
    assert report.verdict == "healthy", json.dumps(report.to_dict()["findings"], indent=1)
    assert report.diagnosis is None


def diagnosis(report: Report) -> str:
    d = report.diagnosis
    assert d is not None, json.dumps([q["metrics"] for q in report.to_dict()["quantizers"]], indent=1)
    return d.id


def metrics(report: Report, name: str = "") -> dict[str, float]:
    (q,) = [q for q in report.quantizers if q.name == name] or report.quantizers[:1]
    return q.metrics


class ConvAE(nn.Module):
    """1x1-conv autoencoder around a quantizer that takes and returns channels-first maps
    (taming / diffusers convention: `quantize(z) -> (z_q, loss, info)`)."""

    def __init__(self, quantize: nn.Module, channels: int = 8, dim: int = 4, gain: float = 1.0):
        super().__init__()
        self.encoder = nn.Conv2d(channels, dim, 1)
        self.quantize = quantize
        self.decoder = nn.Conv2d(dim, channels, 1)
        self.gain = gain

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.gain

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, vq_loss, _ = self.quantize(self.encode(x))
        return self.decoder(z_q), vq_loss


def train_ae(model: ConvAE, opt: torch.optim.Optimizer, data: torch.Tensor, steps: int,
             g: torch.Generator, batch: int = 16) -> None:
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        recon, vq_loss = model(x)
        loss = (recon - x).pow(2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


class VQVAE2Quantizers(nn.Module):
    """The quantizer part of rosinality's VQ-VAE-2 `VQVAE` (same attribute names)."""

    def __init__(self, dim: int, n_embed: int):
        super().__init__()
        self.quantize_conv_t = nn.Conv2d(dim, dim, 1)
        self.quantize_t = Quantize(dim, n_embed)
        self.quantize_conv_b = nn.Conv2d(2 * dim, dim, 1)
        self.quantize_b = Quantize(dim, n_embed)


def encodec_model(rvq: nn.Module) -> nn.Module:
    """An object with encodec's `EncodecModel` attribute path to the quantizer: `quantizer.vq`."""
    model = nn.Module()
    model.quantizer = nn.Module()
    model.quantizer.vq = rvq
    return model


# --- healthy states ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthy_lucidrains(lib, out: Path) -> Paths:
    """lucidrains `VectorQuantize`, k-means init, decay 0.8, 64 codes on 32 unit-noise clusters in
    16-d, 40 steps of 1024 vectors. Measured: 0 dead codes, perplexity ~53/64, EMA invariant exact,
    probe scale ratio ~1.1."""
    g = gen(0)
    sample = mixture(g)
    vq = lib.VectorQuantize(dim=16, codebook_size=64, kmeans_init=True, decay=0.8)
    for _ in range(40):
        vq(sample(1024)[None])
    ckpt = out / "lucidrains_healthy.pt"
    torch.save({"model": prefixed(vq, "quantizer."), "step": 40}, ckpt)
    probe = out / "lucidrains_healthy_probe.pt"
    torch.save(sample(4096), probe)
    return {"ckpt": ckpt, "probe": probe}


@pytest.fixture(scope="module")
def healthy_encodec(lib, out: Path) -> Paths:
    """encodec `ResidualVectorQuantization`, 2 stages, k-means init (10 iters), decay 0.8, default
    dead-code threshold 2, inputs [B, D, T] as encodec feeds them. Measured: 6/64 dead codes on
    stage 0 (9%), none on stage 1, EMA invariant exact, probe scale ratio 1.2 and 1.7. (With decay 0.99 and 60 steps the codebook is still ~20x smaller
    than its inputs: encodec's k-means init sets `embed_avg = centroid` but `cluster_size = bins`,
    so `embed` starts at ~centroid/bins and recovers as 1 - 0.99^t; vqdoctor reports that as a
    scale mismatch, correctly. 0.8 is audiocraft's class default and settles within the run.)"""
    g = gen(1)
    sample = mixture(g)
    rvq = lib.core_vq.ResidualVectorQuantization(num_quantizers=2, dim=16, codebook_size=64,
                                                  kmeans_init=True, kmeans_iters=10, decay=0.8)
    for _ in range(40):
        rvq(sample(2048).reshape(8, 256, 16).transpose(1, 2))
    ckpt = out / "encodec_healthy.pt"
    torch.save(encodec_model(rvq).state_dict(), ckpt)  # encodec saves the raw state dict
    probe = out / "encodec_healthy_probe.pt"
    torch.save(sample(4096).reshape(16, 256, 16).transpose(1, 2), probe)  # [B, D, T]
    return {"ckpt": ckpt, "probe": probe}


@pytest.fixture(scope="module")
def healthy_diffusers(lib, out: Path) -> Paths:
    """diffusers `VectorQuantizer` (legacy loss, beta 0.25) in a 1x1-conv autoencoder, codebook
    re-initialised N(0, 1)/sqrt(D) so codes (||e|| ~1) match the encoder outputs (||z|| ~1), trained
    60 Adam steps; a Lightning checkpoint with optimizer state. Measured: probe uses 63/64 codes,
    scale ratio 1.06."""
    g = gen(2)
    quantize = lib.DiffusersVectorQuantizer(64, 4, beta=0.25)
    nn.init.normal_(quantize.embedding.weight, 0.0, 4 ** -0.5)
    model = ConvAE(quantize)
    data = torch.randn(256, 8, 8, 8, generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    train_ae(model, opt, data, 60, g)
    ckpt = lightning(model, opt, 60, out / "diffusers_healthy.ckpt")
    probe = out / "diffusers_healthy_probe.pt"
    with torch.no_grad():
        torch.save(model.encode(data), probe)  # [N, D, H, W]
    return {"ckpt": ckpt, "probe": probe}


@pytest.fixture(scope="module")
def healthy_rosinality(out: Path) -> Paths:
    """rosinality VQ-VAE-2 top and bottom `Quantize` (randn [dim, n_embed] init, zero-init counts,
    decay 0.99), 4-d unit-scale inputs that reach every code at the first step (4096 vectors for
    16 codes), 150 steps; saved from DDP (`module.` prefix) like rosinality's train_vqvae.py.
    Measured: 1/16 codes dead on each level, max/median norm ~10, probe scale ratio ~1.15."""
    g = gen(3)
    model = VQVAE2Quantizers(4, 16)
    for _ in range(150):
        model.quantize_t(torch.randn(4096, 4, generator=g))
        model.quantize_b(torch.randn(4096, 4, generator=g))
    ckpt = out / "vqvae_150.pt"
    torch.save(prefixed(model, "module."), ckpt)
    probe = out / "rosinality_healthy_probe.pt"
    torch.save({"quantize_t": torch.randn(4096, 4, generator=g),
                "quantize_b": torch.randn(4096, 4, generator=g)}, probe)
    return {"ckpt": ckpt, "probe": probe}


@pytest.fixture(scope="module")
def healthy_zalando(out: Path) -> Paths:
    """zalando `VectorQuantizerEMA` (stored smoothed counts, `_ema_w` Parameter), 32 codes, 4-d
    unit-scale maps, 150 steps. Measured: 2/32 dead by counts, probe uses 30/32."""
    g = gen(4)
    model = nn.Module()
    model._vq_vae = VectorQuantizerEMA(32, 4)
    for _ in range(150):
        model._vq_vae(torch.randn(256, 4, 4, 4, generator=g))
    ckpt = out / "zalando_healthy.pt"
    torch.save(model.state_dict(), ckpt)
    probe = out / "zalando_healthy_probe.pt"
    torch.save(torch.randn(64, 4, 8, 8, generator=g), probe)
    return {"ckpt": ckpt, "probe": probe}


HEALTHY = ["healthy_lucidrains", "healthy_encodec", "healthy_diffusers", "healthy_rosinality",
           "healthy_zalando"]


@pytest.mark.parametrize("scenario", HEALTHY)
@pytest.mark.parametrize("with_probe", [False, True], ids=["no-probe", "probe"])
def test_healthy_states_raise_no_alarm(scenario: str, with_probe: bool,
                                       request: pytest.FixtureRequest) -> None:
    s = request.getfixturevalue(scenario)
    report = inspect(s["ckpt"], probe=s["probe"] if with_probe else None)
    assert_healthy(report)
    assert report.source["safe_load"] is True
    if with_probe:
        for q in report.quantizers:  # within 3x (the rule warns from 10x); later RVQ stages
            assert 1 / 3 < q.metrics["scale_ratio"] < 3, q.name  # read ~1.7: centroids of residuals


def test_healthy_layouts_are_read_as_their_library(healthy_lucidrains, healthy_encodec,
                                                   healthy_rosinality, healthy_zalando) -> None:
    luc = inspect(healthy_lucidrains["ckpt"])
    assert [(q.name, q.info["kind"], q.info["library"]) for q in luc.quantizers] == [
        ("quantizer", "vq-ema", "vector-quantize-pytorch")]
    assert luc.source["container"] == "model"
    enc = inspect(healthy_encodec["ckpt"])
    assert [(q.name, q.info["library"], q.info.get("stage")) for q in enc.quantizers] == [
        ("quantizer.vq.layers.0", "encodec", 0), ("quantizer.vq.layers.1", "encodec", 1)]
    ros = inspect(healthy_rosinality["ckpt"])
    assert [(q.name, q.info["codebook_size"], q.info["dim"]) for q in ros.quantizers] == [
        ("quantize_t", 16, 4), ("quantize_b", 16, 4)]  # [dim, n_embed] read transposed, DDP prefix gone
    zal = inspect(healthy_zalando["ckpt"])
    assert [(q.name, q.info["library"]) for q in zal.quantizers] == [("_vq_vae", "zalando")]


# --- dead codes --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_lucidrains(lib, out: Path) -> Paths:
    """Dead codes drifting to the origin (docs/ema-and-layouts.md#dead-codes-drift-to-the-origin): lucidrains `VectorQuantize`, 1024 codes in 64-d,
    no k-means (kaiming-uniform init), decay 0.8, inputs on a 4-d subspace; safetensors at step 5
    and step 60. Unused codes' counts and EMA sums decay together, so their rows stay put until
    decay^t ~ eps and then collapse to 0 (<= 1.32; from 1.34 they keep their init). Measured at
    step 60: 86% (1.32) / 84% (1.34) of the codes with count < 1% of n/K: most of the codebook
    wasted, a warning (256 codes left 42-50% dead: partial usage, an info note)."""
    from safetensors.torch import save_file

    g = gen(5)
    sample = subspace(g, 64, 4)
    vq = lib.VectorQuantize(dim=64, codebook_size=1024, decay=0.8)
    paths = {}
    for step in range(1, 61):
        vq(sample(1024)[None])
        if step in (5, 60):
            paths[step] = out / f"lucidrains_dead_{step}.safetensors"
            save_file({k: v.contiguous() for k, v in prefixed(vq, "vq.").items()}, paths[step])
    probe = out / "lucidrains_dead_probe.pt"
    torch.save(sample(4096), probe)
    return {"early": paths[5], "ckpt": paths[60], "probe": probe}


def test_dead_codes_high_dim_init_low_dim_data(dead_lucidrains) -> None:
    for probe in (None, dead_lucidrains["probe"]):
        report = inspect(dead_lucidrains["ckpt"], probe=probe)
        assert diagnosis(report) == "dead-codes"
        m = metrics(report)
        assert m["dead_fraction"] > 0.4
        # <= 1.32: unused rows decay to the origin with their counts; >= 1.34 keeps them at init
        assert (m["zero_row_fraction"] == 0.0) if LUCIDRAINS_ZERO_INIT else (m["zero_row_fraction"] > 0.4)
        ev = report.diagnosis.evidence
        assert ev["source"] in ("dead_fraction", "probe_dead_fraction") and ev["dead_codes"] > 100
        found = {f.id for f in report.findings}
        assert not found & {"ema-divergence", "scale-mismatch", "codebook-redundancy"}, ids(report)
        if probe is not None:
            assert 0.5 < m["scale_ratio"] < 2  # the scales match: dead codes are the root


def test_dead_code_growth_between_two_checkpoints(dead_lucidrains) -> None:
    early = inspect(dead_lucidrains["early"])
    report = inspect(dead_lucidrains["early"], dead_lucidrains["ckpt"])
    m = metrics(report)
    ev = report.diagnosis.evidence
    if LUCIDRAINS_ZERO_INIT:
        # zero-initialised counts: a code never selected holds exactly 0 from the first step, so
        # the early checkpoint already shows the dead codes the later one has. Its row is never
        # touched either (no decay to the origin), so two checkpoints also show the selected codes
        # at the data scale, ~160x the never-selected ones still at lucidrains' tiny init: the
        # init-scale mismatch that stranded them, ranked above the dead codes it explains
        assert diagnosis(early) == "dead-codes"
        assert metrics(early)["dead_fraction"] > 0.4 and m["dead_fraction_first"] > 0.4
        assert diagnosis(report) == "scale-mismatch" and ev["moved_rows_norm_ratio"] > 50
        assert "dead-codes" in [i for i, _ in ids(report)]
        return
    assert diagnosis(report) == "dead-codes"
    # ones-initialised counts take ln(0.01)/ln(0.8) ~ 21 steps to fall below 1% of n/K
    assert_healthy(early)
    assert m["dead_fraction_first"] == 0.0 and m["dead_fraction_delta"] > 0.4
    assert ev["dead_fraction_first"] == 0.0 and ev["dead_fraction_delta"] > 0.4
    assert "up from 0.0%" in report.diagnosis.message
    assert "frozen-codebook" not in {f.id for f in report.findings}


# --- scale mismatch ----------------------------------------------------------------------------------


def tiny_vqmodel(lib: types.SimpleNamespace, n_codes: int = 64, dim: int = 4) -> nn.Module:
    return lib.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,),
                       layers_per_block=1, latent_channels=dim, num_vq_embeddings=n_codes,
                       vq_embed_dim=dim, norm_num_groups=4, sample_size=8)


@pytest.fixture(scope="module")
def mismatch_diffusers(lib, out: Path) -> Paths:
    """Scale mismatch at init (docs/ema-and-layouts.md#scale-mismatch-at-init): diffusers `VQModel`
    with its default uniform(+-1/K) codebook (||e|| ~0.02) against unit-scale encoder outputs
    (||z|| ~0.5), 20 Adam steps on random images, `save_pretrained` folder; probe =
    `encode(x).latents` [B, D, H, W]. Measured: scale ratio 23, nearest code 8 code spacings away,
    probe uses 27/64 codes (perplexity 10)."""
    g = gen(6)
    model = tiny_vqmodel(lib)
    data = torch.randn(64, 3, 8, 8, generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(20):
        x = data[torch.randint(0, 64, (16,), generator=g)]
        dec = model.decode(model.encode(x).latents)
        loss = (dec.sample - x).pow(2).mean() + dec.commit_loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = out / "vqmodel_mismatch"
    model.save_pretrained(folder)
    probe = out / "vqmodel_mismatch_probe.pt"
    with torch.no_grad():
        torch.save(model.encode(data).latents, probe)
    return {"ckpt": folder, "probe": probe}


@pytest.fixture(scope="module")
def mismatch_taming(out: Path) -> Paths:
    """taming `VectorQuantizer2` (uniform(+-1/512) init) behind an encoder whose outputs are scaled
    x100, Lightning checkpoints after 5 and 40 Adam steps; probe {"z": encoder outputs}. Measured
    (after 20 steps): scale ratio 4.2e4, nearest code 2.8e4 code spacings away, probe uses 16/512
    codes. The codes selected since step 5 sit at 10.9x the norm of the 87% never selected
    (Adam moves a code ~lr per step: 9.8 after 15 steps, 11.1 after 75)."""
    g = gen(7)
    model = ConvAE(VectorQuantizer2(512, 4), gain=100.0)
    data = torch.randn(256, 8, 8, 8, generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    train_ae(model, opt, data, 5, g)
    early = lightning(model, opt, 5, out / "taming_x100_5.ckpt")
    train_ae(model, opt, data, 35, g)
    ckpt = lightning(model, opt, 40, out / "taming_x100.ckpt")
    probe = out / "taming_x100_probe.pt"
    with torch.no_grad():
        torch.save({"z": model.encode(data)}, probe)
    return {"early": early, "ckpt": ckpt, "probe": probe}


def test_scale_mismatch_diffusers_vqmodel_folder(mismatch_diffusers) -> None:
    report = inspect(mismatch_diffusers["ckpt"], probe=mismatch_diffusers["probe"])
    assert report.source["format"] == "hf-folder"
    (q,) = report.quantizers
    assert (q.name, q.info["library"], q.info["codebook_size"]) == ("quantize", "diffusers", 64)
    assert diagnosis(report) == "scale-mismatch"
    assert q.metrics["scale_ratio"] > 10
    caused = {f.id: f.caused_by for f in report.findings}
    assert caused.get("dead-codes") in (None, "scale-mismatch")
    assert all(c in (None, "scale-mismatch", "dead-codes") for c in caused.values())


def test_scale_mismatch_taming_x100(mismatch_taming) -> None:
    report = inspect(mismatch_taming["ckpt"], probe=mismatch_taming["probe"])
    assert diagnosis(report) == "scale-mismatch"
    d = report.diagnosis
    assert d.severity == "error" and d.evidence["scale_ratio"] > 1e3
    assert d.evidence["z_norm_median"] > 1e3 * d.evidence["code_norm_median"]


def test_scale_mismatch_from_two_checkpoints_without_probe(mismatch_taming) -> None:
    # No encoder outputs: the codes selected in between moved out to the data's scale, the
    # never-selected ones kept their uniform(+-1/K) init bits.
    report = inspect(mismatch_taming["early"], mismatch_taming["ckpt"])
    assert diagnosis(report) == "scale-mismatch", ids(report)
    ev = report.diagnosis.evidence
    assert ev["moved_rows_norm_ratio"] > 5 and ev["rows_unchanged_fraction"] > 0.5
    assert next(f for f in report.findings if f.id == "dead-codes").caused_by == "scale-mismatch"


# --- EMA blow-up from zero-initialised counts ----------------------------------------------------------


@pytest.fixture(scope="module")
def blowup_rosinality(out: Path) -> Paths:
    """Zero-init counts without debiasing
    (docs/ema-and-layouts.md#zero-initialised-counts-blow-rows-up): rosinality `Quantize`, 512 codes
    in 64-d, decay 0.99, i.i.d. unit inputs of 1024 vectors, 5 steps. An unused code keeps m =
    decay^t e0 but its smoothed count is ~eps. Measured: ~225 rows per level at ~6.7e3 x the median
    norm of the codes in use (those are themselves inflated ~20x by the same division), perplexity
    4.4/512."""
    g = gen(8)
    model = VQVAE2Quantizers(64, 512)
    for _ in range(5):
        model.quantize_t(torch.randn(1024, 64, generator=g))
        model.quantize_b(torch.randn(1024, 64, generator=g))
    ckpt = out / "vqvae_blowup.pt"
    torch.save(prefixed(model, "module."), ckpt)
    return {"ckpt": ckpt}


@pytest.fixture(scope="module")
def blowup_zalando(out: Path) -> Paths:
    """The same mechanism in zalando's `VectorQuantizerEMA` (its unused rows come from `_ema_w`,
    and the stored counts are re-smoothed every step, so the blow-up shrinks as ~1/t). Measured
    after 5 steps: 222 rows at 1.1e3 x the median norm of the codes in use."""
    g = gen(9)
    model = nn.Module()
    model._vq_vae = VectorQuantizerEMA(512, 64)
    for _ in range(5):
        model._vq_vae(torch.randn(64, 64, 4, 4, generator=g))
    ckpt = out / "zalando_blowup.pt"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, ckpt)
    return {"ckpt": ckpt}


@pytest.fixture(scope="module")
def blowup_encodec(lib, out: Path) -> Paths:
    """encodec `ResidualVectorQuantization` without k-means: kaiming-uniform codes, zero counts,
    decay 0.99, default threshold 2 (its replacement is overwritten in the same call, encodec
    #61), 60 steps. Measured: stage 1 has a row at 2.6e4 x the median norm of the codes in use (a
    code unused at step 1) and 53% dead codes; stage 0 had every code hit at step 1 (no blow-up) and
    lost 45% to competition afterwards, a dead-codes root of its own (no k-means). The same
    buffers are also written into a transformers `EncodecModel` and saved with
    `save_pretrained`, as the HF conversion script does."""
    g = gen(10)
    sample = mixture(g)
    rvq = lib.core_vq.ResidualVectorQuantization(num_quantizers=2, dim=16, codebook_size=64,
                                                  kmeans_init=False, decay=0.99)
    for _ in range(60):
        rvq(sample(2048).reshape(8, 256, 16).transpose(1, 2))
    ckpt = out / "encodec_blowup.pt"
    torch.save(encodec_model(rvq).state_dict(), ckpt)
    cfg = lib.EncodecConfig(target_bandwidths=[2.0], sampling_rate=400, audio_channels=1,
                            hidden_size=16, num_filters=4, num_residual_layers=1,
                            upsampling_ratios=[2, 2], codebook_size=64, codebook_dim=16,
                            num_lstm_layers=1)
    hf = lib.EncodecModel(cfg)
    for q, layer in enumerate(hf.quantizer.layers):
        layer.codebook.load_state_dict(rvq.layers[min(q, 1)]._codebook.state_dict())
    folder = out / "hf_encodec_blowup"
    hf.save_pretrained(folder)
    return {"ckpt": ckpt, "hf": folder, "hf_stages": len(hf.quantizer.layers)}


@pytest.mark.parametrize("scenario", ["blowup_rosinality", "blowup_zalando", "blowup_encodec"])
def test_ema_blowup_from_zero_init_counts(scenario: str, request: pytest.FixtureRequest) -> None:
    report = inspect(request.getfixturevalue(scenario)["ckpt"])
    assert diagnosis(report) == "ema-divergence"
    d = report.diagnosis
    assert "blowup" in d.evidence["sub_causes"] and d.evidence["blowup_ratio"] > 100
    roots = {(f.id, f.quantizer) for f in report.findings if f.caused_by is None}
    stage = {q.name: q.info.get("stage") for q in report.quantizers}
    for f in report.findings:  # a symptom is explained by its own stage or an earlier one
        if f.caused_by == "ema-divergence":
            assert any(i == "ema-divergence" and (q == f.quantizer or (stage[q] or 0) < (stage[f.quantizer] or 0))
                       for i, q in roots), ids(report)
    if scenario == "blowup_encodec":
        # stage 0 never blew up; its dead codes are its own, not stage 1's doing
        assert ("dead-codes", "quantizer.vq.layers.0") in roots, ids(report)
        assert ("ema-divergence", "quantizer.vq.layers.1") in roots
    else:  # nothing but the blow-up is unexplained
        assert {i for i, _ in roots} == {"ema-divergence"}, ids(report)


def test_ema_blowup_in_transformers_encodec_folder(blowup_encodec) -> None:
    report = inspect(blowup_encodec["hf"])
    assert report.source["format"] == "hf-folder"
    names = [q.name for q in report.quantizers]
    assert names == [f"quantizer.layers.{q}" for q in range(blowup_encodec["hf_stages"])]
    assert {q.info["library"] for q in report.quantizers} == {"transformers"}
    assert diagnosis(report) == "ema-divergence"
    assert report.diagnosis.quantizer in names


def test_ema_blowup_with_probe_names_the_mechanism_not_the_scale(blowup_rosinality) -> None:
    """A probe shows inputs 50x smaller than the (inflated) codes: a symptom of the blow-up."""
    g = gen(11)
    probe = blowup_rosinality["ckpt"].with_name("vqvae_blowup_probe.pt")
    torch.save({"quantize_t": torch.randn(2048, 64, generator=g),
                "quantize_b": torch.randn(2048, 64, generator=g)}, probe)
    report = inspect(blowup_rosinality["ckpt"], probe=probe)
    assert diagnosis(report) == "ema-divergence"
    caused = {(f.id, f.quantizer): f.caused_by for f in report.findings}
    assert caused[("scale-mismatch", "quantize_t")] == "ema-divergence"


# --- non-finite --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nonfinite_lucidrains(lib, out: Path) -> Paths:
    """One Inf in the inputs of one EMA update: lucidrains sums `x.T @ onehot`, where Inf x 0 is
    NaN for every code, so every row of `embed_avg` and of the codebook turns NaN at once.
    Measured: 64/64 rows and 1024 elements non-finite in embed and embed_avg; counts finite."""
    g = gen(12)
    sample = mixture(g)
    vq = lib.VectorQuantize(dim=16, codebook_size=64, kmeans_init=True, decay=0.8)
    for step in range(30):
        x = sample(1024)
        if step == 25:
            x[3, 5] = float("inf")
        vq(x[None])
    ckpt = out / "lucidrains_inf.ckpt"
    torch.save({"state_dict": prefixed(vq, "model.vq."), "global_step": 30, "epoch": 0}, ckpt)
    return {"ckpt": ckpt}


@pytest.fixture(scope="module")
def fp16_encodec(lib, out: Path) -> Paths:
    """fp16 EMA buffers where Laplace smoothing underflows
    (docs/ema-and-layouts.md#smoothing-underflows-in-float16): an encodec codebook after `.half()`,
    no k-means, decay 0.8, 256 codes, 8192 vectors on a 2-d subspace per step. An unused code's
    smoothed count (0 + 1e-5) / (n + K eps) * n is exactly 0 in fp16, so embed = embed_avg / 0 =
    Inf. Measured after 3 steps: 231/256 rows Inf."""
    g = gen(13)
    sample = subspace(g, 16, 2)
    codebook = lib.core_vq.EuclideanCodebook(16, 256, kmeans_init=False, decay=0.8).half()
    for _ in range(3):
        codebook(sample(8192).half())
    model = nn.Module()
    model.quantizer = nn.Module()
    model.quantizer.vq = nn.Module()
    model.quantizer.vq.layers = nn.ModuleList([nn.Module()])
    model.quantizer.vq.layers[0]._codebook = codebook
    ckpt = out / "encodec_fp16.pt"
    torch.save(model.state_dict(), ckpt)
    return {"ckpt": ckpt}


def test_nonfinite_from_inf_input_during_ema_update(nonfinite_lucidrains) -> None:
    report = inspect(nonfinite_lucidrains["ckpt"])
    assert diagnosis(report) == "non-finite"
    d = report.diagnosis
    assert d.severity == "error" and d.quantizer == "model.vq"
    assert d.evidence["nonfinite_rows"] == 64 and d.evidence["origin"] == "ema"
    assert all(f.caused_by in (None, "non-finite") for f in report.findings), ids(report)


def test_fp16_smoothing_underflow_is_named_as_the_root_of_inf_rows(fp16_encodec) -> None:
    report = inspect(fp16_encodec["ckpt"])
    # The low-precision EMA buffers are the mechanism (VQ004 lists underflowing smoothing);
    # the Inf rows they produce are its consequence.
    assert diagnosis(report) == "ema-divergence"
    assert "lowp" in report.diagnosis.evidence["sub_causes"]
    nf = next(f for f in report.findings if f.id == "non-finite")
    assert nf.caused_by == "ema-divergence" and nf.evidence["nonfinite_rows"] > 200
    assert "float16" in nf.fix
    assert report.quantizers[0].info["dtypes"]["cluster_size"] == "float16"


# --- frozen codebook across two checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_taming(out: Path) -> Paths:
    """taming `VectorQuantizer2` left out of the optimizer (only encoder/decoder parameters given
    to Adam), Lightning checkpoints at steps 10 and 40. The codebook gets gradient but no step.
    Measured: bit-identical codebook, no Adam state for it."""
    g = gen(14)
    model = ConvAE(VectorQuantizer2(64, 4))
    nn.init.normal_(model.quantize.embedding.weight, 0.0, 4 ** -0.5)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("quantize.")], 1e-3)
    data = torch.randn(256, 8, 8, 8, generator=g)
    train_ae(model, opt, data, 10, g)
    early = lightning(model, opt, 10, out / "taming_frozen_10.ckpt")
    train_ae(model, opt, data, 30, g)
    late = lightning(model, opt, 40, out / "taming_frozen_40.ckpt")
    return {"early": early, "ckpt": late}


@pytest.fixture(scope="module")
def frozen_lucidrains(lib, out: Path) -> Paths:
    """lucidrains `VectorQuantize` with decay 1.0: `lerp(new, 1 - decay)` never moves the counts
    or the sums after k-means init. Raw state dicts at steps 5 and 25. Measured: codebook and
    counts bit-identical; the counts stay the integer k-means bin sizes."""
    g = gen(15)
    sample = mixture(g)
    vq = lib.VectorQuantize(dim=16, codebook_size=64, kmeans_init=True, decay=1.0)
    for _ in range(5):
        vq(sample(1024)[None])
    early = out / "lucidrains_decay1_5.pt"
    torch.save(vq.state_dict(), early)
    for _ in range(20):
        vq(sample(1024)[None])
    late = out / "lucidrains_decay1_25.pt"
    torch.save(vq.state_dict(), late)
    return {"early": early, "ckpt": late}


@pytest.fixture(scope="module")
def frozen_dac(lib, out: Path) -> Paths:
    """transformers `DacModel` (tiny config, 2 codebooks of 64 x 4) trained 8 Adam steps on random
    audio with the codebooks left out of the optimizer; `save_pretrained` at steps 3 and 8."""
    g = gen(16)
    cfg = lib.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=8,
                        n_codebooks=2, codebook_size=64, codebook_dim=4, hidden_size=16,
                        upsampling_ratios=[2, 2])
    model = lib.DacModel(cfg)
    opt = torch.optim.Adam([p for n, p in model.named_parameters()
                            if not n.endswith("codebook.weight")], 1e-3)
    audio = torch.randn(8, 1, 256, generator=g)
    folders = {}
    for step in range(1, 9):
        res = model(audio)
        loss = (res.audio_values[..., :256] - audio[:, 0]).pow(2).mean() + res.loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (3, 8):
            folders[step] = out / f"dac_{step}"
            model.save_pretrained(folders[step])
    return {"early": folders[3], "ckpt": folders[8]}


@pytest.mark.parametrize("scenario", ["frozen_taming", "frozen_lucidrains", "frozen_dac"])
def test_frozen_codebook_across_two_checkpoints(scenario: str, request: pytest.FixtureRequest) -> None:
    s = request.getfixturevalue(scenario)
    assert_healthy(inspect(s["ckpt"]))  # one checkpoint alone cannot show it
    report = vqdoctor.inspect([str(s["early"]), str(s["ckpt"])])
    assert diagnosis(report) == "frozen-codebook"
    assert report.source["paths"] == [str(s["early"]), str(s["ckpt"])]
    for q in report.quantizers:
        assert q.metrics["codebook_frozen"] == 1.0 and q.metrics["codebook_rel_change"] == 0.0
    frozen = [f for f in report.findings if f.id == "frozen-codebook"]
    assert {f.quantizer for f in frozen} == {q.name for q in report.quantizers}
    if scenario == "frozen_lucidrains":
        assert frozen[0].evidence["counts_frozen"] == 1.0 and "decay below 1" in frozen[0].fix
    else:
        assert "optimizer" in frozen[0].fix


# --- residual quantizer: only a later stage is sick -------------------------------------------------------


@pytest.fixture(scope="module")
def rvq_stage1_churn(lib, out: Path) -> Paths:
    """lucidrains `ResidualVQ` with 64 codes at stage 0 and 1024 at stage 1 (per-stage
    `codebook_size`), k-means init, decay 0.8, `threshold_ema_dead_code=2`, 1024 vectors per step.
    Stage 0 sees n/K = 16 and is healthy; stage 1 sees n/K = 1, below the threshold, so most of its
    codes fall under 2 every step and are reset to exactly 2 (replacement churn:
    docs/ema-and-layouts.md#replacement-churn). Measured: stage 1 78% of counts == 2.0 at the last
    step; stage 0 none."""
    g = gen(17)
    sample = mixture(g)
    rvq = lib.ResidualVQ(dim=16, num_quantizers=2, codebook_size=(64, 1024), kmeans_init=True,
                         decay=0.8, threshold_ema_dead_code=2)
    for _ in range(20):
        rvq(sample(1024)[None])
    ckpt = out / "rvq_churn.pt"
    torch.save({"model": prefixed(rvq, "quantizer."), "optimizer": {}}, ckpt)
    probe = out / "rvq_churn_probe.pt"
    torch.save(sample(4096), probe)
    return {"ckpt": ckpt, "probe": probe}


def test_residual_stage1_sick_stage0_clean(rvq_stage1_churn) -> None:
    if LUCIDRAINS_ZERO_INIT:
        # >= 1.34 converts threshold_ema_dead_code=2 to a ratio of the mean count (2/K per stage)
        # and resets to that ratio: a threshold can no longer exceed n/K, so this cannot churn
        report = inspect(rvq_stage1_churn["ckpt"], probe=rvq_stage1_churn["probe"])
        assert report.verdict == "healthy", ids(report)
        assert [metrics(report, q)["replaced_fraction"] for q in ("quantizer.layers.0", "quantizer.layers.1")] \
            == [0.0, 0.0]
        return
    for probe in (None, rvq_stage1_churn["probe"]):
        report = inspect(rvq_stage1_churn["ckpt"], probe=probe)
        assert [q.name for q in report.quantizers] == ["quantizer.layers.0", "quantizer.layers.1"]
        assert diagnosis(report) == "replacement-churn"
        d = report.diagnosis
        assert d.quantizer == "quantizer.layers.1"
        assert d.evidence["replaced_fraction"] > 0.5
        assert d.evidence["count_expected"] == pytest.approx(2.0, rel=0.1)  # n/K of stage 1
        assert not [f for f in report.findings if f.quantizer == "quantizer.layers.0"
                    and f.severity in ("error", "warning")], ids(report)
        assert metrics(report, "quantizer.layers.0")["replaced_fraction"] == 0.0


# --- the CLI on real files ----------------------------------------------------------------------------


def cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_healthy_exit_0(healthy_lucidrains) -> None:
    result = cli("inspect", str(healthy_lucidrains["ckpt"]), "--probe", str(healthy_lucidrains["probe"]))
    assert result.exit_code == 0, result.output
    assert "healthy" in result.stdout.lower()
    assert result.stderr.strip().splitlines()[-1].startswith("healthy: no problems found")


def test_cli_json_blowup_exit_1(blowup_rosinality) -> None:
    result = cli("inspect", str(blowup_rosinality["ckpt"]), "--format", "json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1 and data["verdict"] == "failing"
    assert data["findings"][0]["id"] == "ema-divergence" and data["findings"][0]["caused_by"] is None
    assert "(diagnosis: ema-divergence)" in result.stderr


def test_cli_two_checkpoints_and_probe(frozen_taming, mismatch_diffusers) -> None:
    result = cli("inspect", str(frozen_taming["early"]), str(frozen_taming["ckpt"]), "--format",
                 "json")
    assert result.exit_code == 1 and json.loads(result.stdout)["findings"][0]["id"] == "frozen-codebook"
    result = cli("inspect", str(mismatch_diffusers["ckpt"]), "--probe", str(mismatch_diffusers["probe"]),
                 "--format", "markdown", "--fail-on", "warning")
    assert result.exit_code == 1, result.output
    assert "scale-mismatch" in result.stdout and "(diagnosis: scale-mismatch)" in result.stderr


def test_cli_fail_on_never_still_reports(fp16_encodec) -> None:
    result = cli("inspect", str(fp16_encodec["ckpt"]), "--fail-on", "never")
    assert result.exit_code == 0
    assert "ema-divergence" in result.stdout and "non-finite" in result.stdout
