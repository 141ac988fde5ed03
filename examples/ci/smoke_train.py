"""A CI smoke training: a tiny VQ-EMA autoencoder on synthetic data, a few seconds on a CPU.

Plain torch, no vqdoctor import: it stands for your own training script.

    python examples/ci/smoke_train.py --out smoke             # healthy: the gate passes
    python examples/ci/smoke_train.py --out smoke --bug       # collapses: the gate fails
    vqdoctor gate smoke/checkpoint.pt --probe smoke/probe.pt

`--bug` skips exactly one line (marked `THE ONE LINE` below): the standardisation of the inputs.
The raw inputs sit far from the origin (every feature has a mean of about 4), so each Adam step
moves all encoder outputs together by more than the EMA codebook can follow; one code ends up
nearest to every input, the others are never chosen again (perplexity ~1, 63 of 64 codes dead).

Files written to `--out`: `checkpoint.pt` (the model's state dict; the quantizer's buffers are
`quantizer.embed` [K, D], `quantizer.cluster_size` [K], `quantizer.embed_avg` [K, D]) and
`probe.pt` (encoder outputs on held-out data, [N, D]: the quantizer's input). The live watch
finds the quantizer without being told too (an EMA codebook: `embed`, `cluster_size`,
`embed_avg`), so the script can also run under `vqdoctor watch`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class EMAQuantizer(nn.Module):
    """Euclidean VQ whose codebook is the EMA of the encoder outputs assigned to each code."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.9, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.decay, self.eps = codebook_size, decay, eps
        self.register_buffer("embed", torch.zeros(codebook_size, dim))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim))

    @torch.no_grad()
    def init_codes(self, z: torch.Tensor) -> None:
        """Data-dependent init: K random encoder outputs."""
        codes = z[torch.randperm(z.shape[0])[: self.codebook_size]]
        self.embed.copy_(codes)
        self.embed_avg.copy_(codes)  # counts start at 1, so embed == embed_avg / cluster_size

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through output, code indices, commitment loss)."""
        zd = z.detach()
        dist = zd.pow(2).sum(1, keepdim=True) - 2 * zd @ self.embed.t() + self.embed.pow(2).sum(1)
        idx = dist.argmin(1)
        q = self.embed[idx]
        if self.training:
            onehot = F.one_hot(idx, self.codebook_size).to(zd.dtype)
            self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(onehot.t() @ zd, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
            self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        return z + (q - z).detach(), idx, F.mse_loss(z, q)


class AutoEncoder(nn.Module):
    """encoder -> quantizer -> decoder."""

    def __init__(self, input_dim: int, dim: int, codebook_size: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, 64), nn.ReLU(), nn.Linear(64, dim))
        self.quantizer = EMAQuantizer(codebook_size, dim)
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, input_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, idx, commit = self.quantizer(self.encoder(x))
        return self.decoder(q), idx, commit


def make_data(n: int, input_dim: int, clusters: int = 64) -> torch.Tensor:
    """A Gaussian mixture whose clusters share an offset: raw features have a mean of ~4."""
    centres = 4.0 + torch.randn(clusters, input_dim)
    return centres[torch.randint(0, clusters, (n,))] + 0.3 * torch.randn(n, input_dim)


def perplexity(idx: torch.Tensor, k: int) -> float:
    """exp(entropy) of the code assignments."""
    p = torch.bincount(idx, minlength=k).double()
    p = p[p > 0] / p.sum()
    return math.exp(float(-(p * p.log()).sum()))


def main(argv: list[str] | None = None) -> None:
    """Train, then save the checkpoint and the probe (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bug", action="store_true",
                    help="skip the input standardisation: the one line that differs")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("smoke"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    input_dim, dim, K, batch = 16, 8, 64, 256
    data = make_data(8192 + 2048, input_dim)
    if not args.bug: data = (data - data.mean(0)) / data.std(0)  # THE ONE LINE  # noqa: E701
    train, held_out = data[:8192], data[8192:]
    model = AutoEncoder(input_dim, dim, K)
    with torch.no_grad():
        model.quantizer.init_codes(model.encoder(train[:2048]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    model.train()
    for step in range(1, args.steps + 1):
        x = train[torch.randint(0, len(train), (batch,))]
        recon, idx, commit = model(x)
        loss = F.mse_loss(recon, x) + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4g}  perplexity {perplexity(idx, K):.1f}")

    model.eval()
    with torch.no_grad():
        z = model.encoder(held_out)
        _, idx, _ = model(held_out)
    print(f"held-out perplexity {perplexity(idx, K):.1f} of {K}, codes used "
          f"{idx.unique().numel()}/{K}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "checkpoint.pt")
    torch.save(z, args.out / "probe.pt")


if __name__ == "__main__":
    main()
