"""Healthy straight-through VQ with a gradient-trained codebook: diffusers `VectorQuantizer`.

A small conv autoencoder on 3x16x16 smooth random images (8x8 latents). The codebook is learned
by the codebook loss (no EMA), with the non-legacy loss (beta 0.25 on the commitment term). Two
changes from the library default, both standard practice: a data-dependent init (the
uniform(+-1/K) table is overwritten by K encoder outputs of the first batch, so codes start where
the data are) and a 10x larger learning rate for the codebook than for the networks (Lancucki et
al. 2020), so the codes keep up with the encoder. Nothing is wrong: usage stays high.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import VectorQuantizer
from torch import nn

SCENARIO = {
    "expect": "healthy",
    "onset": 0,
    "library": "diffusers",
    "family": "vq",
    "K": 256, "D": 16, "tokens_per_step": 2048, "steps": 300,
    "launch": "python",
    "fault": "none: codebook seeded from encoder outputs, codebook lr 1e-2 (nets 1e-3), commitment 0.25",
}
K, D, BATCH, STEPS = 256, 16, 32, 300


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, D, 3, 1, 1))
        self.quantize = VectorQuantizer(K, D, beta=0.25, legacy=False)
        self.decoder = nn.Sequential(nn.Conv2d(D, 32, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(32, 3, 4, 2, 1))

    def forward(self, x):
        z = self.encoder(x)
        z_q, vq_loss, (_, _, idx) = self.quantize(z)
        return self.decoder(z_q), vq_loss, idx.flatten()


def perplexity(idx: torch.Tensor, k: int) -> float:
    p = torch.bincount(idx, minlength=k).float() / idx.numel()
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(2000 + args.seed)

    def batch(n):  # smooth random images: 4x4 noise upsampled to 16x16
        return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear", align_corners=False)

    model = AE()
    with torch.no_grad():  # data-dependent codebook init
        z = model.encoder(batch(BATCH)).permute(0, 2, 3, 1).reshape(-1, D)
        model.quantize.embedding.weight.copy_(z[torch.randperm(z.shape[0])[:K]])
    nets = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.Adam([{"params": nets}, {"params": model.quantize.parameters(), "lr": 1e-2}], lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, vq_loss, idx = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d} loss {loss.item():.4f} perplexity {perplexity(idx, K):6.1f} "
                  f"used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(64)).permute(0, 2, 3, 1).reshape(-1, D)  # 4096 = 16 K vectors
        idx = torch.cdist(z, model.quantize.embedding.weight).argmin(1)
    print(f"held-out: perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K} "
          f"|z| {z.norm(dim=1).median():.3f} |e| {model.quantize.embedding.weight.norm(dim=1).median():.3f} "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
