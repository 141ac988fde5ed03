"""Live discovery that does not depend on names: known classes anywhere, anything else by behaviour.

Real loops call `encoder(x)`, `quantizer(z)` and `decoder(zq)` one after the other (the quantizer is
then its own root, its keys carry no prefix) and name their quantizer `self.block2`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vqdoctor
from tests.fixtures.reference_taming import VectorQuantizer2
from vqdoctor.live.discovery import find_quantizers

K, D = 32, 8


class Plain(nn.Module):
    """A straight-through VQ with a neutral name and a neutral table attribute."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(K, D))

    def forward(self, z):
        i = torch.cdist(z, self.table).argmin(-1)
        q = self.table[i]
        return z + (q - z).detach(), i, (q - z.detach()).pow(2).mean() + (q.detach() - z).pow(2).mean() * 0.25


class Lookup(nn.Module):
    """Owns a [K, D] table but returns floats only (an embedding layer of a decoder): not a quantizer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(K, D)

    def forward(self, x):
        return x @ self.emb.weight.T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.block2, self.head, self.dec = nn.Linear(4, D), Plain(), Lookup(), nn.Linear(D, 4)

    def forward(self, x):
        q, _, aux = self.block2(self.enc(x))
        return self.dec(q) + 0 * self.head(q).sum(), aux


def train(model: nn.Module, doctor, steps: int = 30, batch=lambda: torch.randn(64, 4), lr: float = 1e-2) -> None:
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        x = batch()
        y, aux = model(x)
        loss = (y - x).pow(2).mean() + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        doctor.step(loss=loss)


def test_a_quantizer_with_neutral_names_is_found_by_behaviour(tmp_path) -> None:
    model = Net()
    assert find_quantizers(model) == []  # no layout says it
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10, stats_every=5) as doctor:
        train(model, doctor)
    report = vqdoctor.report(tmp_path / "run")
    assert [(q.name, q.info["kind"], q.info["codebook_size"]) for q in report.quantizers] == [("block2", "vq", K)]
    assert report.quantizers[0].metrics["perplexity"] > 1 and not report.errors
    assert any("found by behaviour" in n for n in report.quantizers[0].notes)


def test_a_module_that_returns_no_indices_is_not_taken(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, D), Lookup())
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10) as doctor:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            doctor.step()
    report = vqdoctor.report(tmp_path / "run")
    assert report.quantizers == [] and report.errors  # and the report says nothing was measured
    assert "no quantizer was found" in report.errors[0]["message"]
    assert report.summary_line().startswith("incomplete")


def test_a_named_custom_module_is_read_from_its_own_table() -> None:
    model = Net()
    [q] = find_quantizers(model, ["block2"])
    assert (q.name, q.codebook_size, q.codebook().shape) == ("block2", K, (1, K, D))


def test_known_classes_are_found_as_roots_and_under_any_name() -> None:
    root = VectorQuantizer2(K, D)
    holder = nn.Module()
    holder.thing = VectorQuantizer2(K, D)
    for model, name in ((root, ""), (holder, "thing")):
        [q] = find_quantizers(model)
        assert (q.name, q.state.kind, q.codebook_size) == (name, "vq", K)
        assert q.state.library != "generic" and q.codebook() is not None


REPO = str(Path(__file__).resolve().parents[2])


def _watched(tmp_path: Path, source: str, arg: str, stats_every: int | None = None):
    """`vqdoctor watch` over a script (one argument): the process and the JSON report's path."""
    script, out = tmp_path / "train.py", tmp_path / "report.json"
    script.write_text(source)
    extra = ["--stats-every", str(stats_every)] if stats_every else []
    proc = subprocess.run([sys.executable, "-m", "vqdoctor", "watch", "--run-dir", str(tmp_path / "run"),
                           "--no-panel", "--flush-every", "10", *extra, "--format", "json", "--output", str(out),
                           "--", sys.executable, str(script), arg],
                          capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stderr
    return proc, out


SEPARATE = """
import torch
from torch import nn
import sys
sys.path.insert(0, sys.argv[1])
from tests.watch.test_watch_discovery import Plain
torch.manual_seed(0)
enc, quant, dec = nn.Linear(4, 8), Plain(), nn.Linear(8, 4)
opt = torch.optim.Adam([*enc.parameters(), *quant.parameters(), *dec.parameters()], 1e-2)
for _ in range(40):
    x = torch.randn(64, 4)
    q, i, aux = quant(enc(x))          # three top-level calls: the quantizer is its own root
    loss = (dec(q) - x).pow(2).mean() + aux
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_separate_top_level_calls_under_the_launcher(tmp_path: Path) -> None:
    proc, out = _watched(tmp_path, SEPARATE, REPO)
    report = json.loads(out.read_text())
    assert [(q["name"], q["codebook_size"]) for q in report["quantizers"]] == [("", K)], proc.stderr
    assert report["complete"] and report["quantizers"][0]["metrics"]["tokens"] == pytest.approx(64)


CLOCKS = """
import sys
import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize
torch.manual_seed(0)
mode = sys.argv[1]
enc, vq, dec = nn.Linear(4, 8), VectorQuantize(dim=8, codebook_size=32, decay=0.8), nn.Linear(8, 4)
params = [*enc.parameters(), *dec.parameters()]  # the EMA quantizer has no parameters
opt = torch.optim.SGD(params, lr=1e-2)
for _ in range(30):
    x = torch.randn(64, 4)
    q, _, commit = vq(enc(x))          # the quantizer is its own root
    loss = (dec(q) - x).pow(2).mean() + commit.sum()
    if mode == "optimizer":
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:                              # a hand-written update, no torch.optim at all
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 1e-2 * p.grad
                p.grad = None
"""


@pytest.mark.parametrize("mode", ["optimizer", "hand-written"])
def test_the_step_clock_of_a_parameter_free_root(tmp_path: Path, mode: str) -> None:
    proc, out = _watched(tmp_path, CLOCKS, mode)
    df = vqdoctor.load_run(tmp_path / "run")
    steps = df[(df["record"] == "step") & (df["quantizer"] == "")]
    assert steps["step"].tolist() == list(range(30)), proc.stderr  # one step per update, not one in all
    assert (steps["tokens"] == 64).all()



GRADIENT_PATHS = """
import sys
import torch
from torch import nn
torch.manual_seed(0)
mode = sys.argv[1]


class Buffered(nn.Module):
    # an EMA-style quantizer: the table is a buffer, not a parameter
    def __init__(self):
        super().__init__()
        self.register_buffer("embed", torch.randn(32, 8))

    def forward(self, z):
        i = torch.cdist(z, self.embed).argmin(-1)
        q = self.embed[i]
        with torch.no_grad():
            self.embed.index_copy_(0, i, 0.9 * self.embed[i] + 0.1 * z.detach())
        out = q if mode == "no-st" else z + (q - z).detach()   # no-st: the code itself, no gradient
        return out, i, (q - z).pow(2).mean()


enc, vq, dec = nn.Linear(4, 8), Buffered(), nn.Linear(8, 4)
params = [*enc.parameters(), *dec.parameters()]
for _ in range(40):
    x = torch.randn(64, 4)
    z = enc(x)
    q, _, commit = vq(z.detach() if mode == "detach" else z)   # the quantizer is its own root
    loss = (dec(q) - x).pow(2).mean() + 0.25 * commit
    loss.backward()
    with torch.no_grad():                                        # a hand-written update
        for p in params:
            if p.grad is not None:
                p -= 1e-2 * p.grad
                p.grad = None
"""


@pytest.mark.parametrize("mode", ["healthy", "detach", "no-st"])
def test_a_broken_gradient_path_of_a_quantizer_called_on_its_own(tmp_path: Path, mode: str) -> None:
    # encoder(x), quantizer(z), decoder(q) as three calls and no torch.optim: the launcher finds
    # the encoder by the tensor it hands the quantizer, and the step clock runs on backward
    proc, out = _watched(tmp_path, GRADIENT_PATHS, mode, stats_every=2)
    report = json.loads(out.read_text())
    assert report["complete"] and [q["codebook_size"] for q in report["quantizers"]] == [32], proc.stderr
    ids = [f["id"] for f in report["findings"] if f["severity"] in ("error", "warning")]
    if mode == "healthy":
        assert "no-encoder-gradient" not in ids, report["findings"]
        return
    assert ids and ids[0] == "no-encoder-gradient", report["findings"]
    top = report["findings"][0]
    key = "st_input_no_grad" if mode == "detach" else "st_output_no_grad"
    assert top["severity"] == "error" and top["evidence"][key] == 1, top


class TinyInitNet(nn.Module):
    """taming's VectorQuantizer2 (uniform(+-1/K) init) under unit-scale encoder outputs."""

    def __init__(self):
        super().__init__()
        self.enc, self.vq, self.dec = nn.Linear(16, 16), VectorQuantizer2(128, 16), nn.Linear(16, 16)

    def forward(self, x):
        q, loss, _ = self.vq(self.enc(x)[..., None, None])
        return self.dec(q[..., 0, 0]), loss


def test_a_run_tells_rows_never_selected_from_the_codes_in_use(tmp_path) -> None:
    # the codes in use move to the data's scale, the rest keep their tiny init bit for bit:
    # that is the scale mismatch (as two checkpoints show it), not 'duplicate' codes
    torch.manual_seed(0)
    model = TinyInitNet()
    data = torch.randn(4096, 16)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=20) as doctor:
        train(model, doctor, 120, batch=lambda: data[torch.randint(0, 4096, (256,))], lr=1e-3)
    report = vqdoctor.report(tmp_path / "run")
    m = report.quantizers[0].metrics
    assert 0.25 <= m["rows_unchanged_fraction"] < 1 and m["moved_rows_norm_ratio"] > 5, m
    ids = [f.id for f in report.findings if f.severity in ("error", "warning")]
    assert ids[0] == "scale-mismatch" and "codebook-redundancy" not in ids, report.findings


class EmbeddingHeld(nn.Module):
    """Olaf-World's VectorQuantizer shape: an nn.Embedding holds the table, the lookup reads its
    weight with cdist (the Embedding's own forward never runs)."""

    def __init__(self):
        super().__init__()
        self.codebook = nn.Embedding(K, D)

    def forward(self, x):
        i = torch.cdist(x, self.codebook.weight).argmin(-1)
        z = self.codebook.weight[i]
        return x + (z - x).detach(), z, i


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.vq, self.dec = nn.Linear(4, D), EmbeddingHeld(), nn.Linear(D, 4)

    def forward(self, x):
        zq, z, _ = self.vq(self.enc(x))
        return self.dec(zq), (z - self.enc(x).detach()).pow(2).mean()


def test_a_table_held_by_an_embedding_layer_is_watched_at_its_owner(tmp_path) -> None:
    torch.manual_seed(0)
    model = EmbeddingNet()
    with vqdoctor.watch(model, tmp_path / "run", flush_every=10) as doctor:
        train(model, doctor)
    report = vqdoctor.report(tmp_path / "run")
    assert [q.name for q in report.quantizers] == ["vq"]
    assert report.to_dict()["complete"] and report.quantizers[0].metrics["tokens"] == pytest.approx(64)
