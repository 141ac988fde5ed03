"""VQ003 scale-mismatch: raw 0..255 pixels against diffusers' uniform(+-1/K) codebook.

diffusers `VectorQuantizer` with its own init (`uniform(-1/K, 1/K)`: with K = 16384 every code has
norm ~1e-4) and a small conv encoder fed images in 0..255 (the `/ 127.5 - 1` normalisation was
left out of the data pipeline). The encoder outputs have norms in the hundreds, ~10^6 times the
codes': the nearest code of every input is simply the code with the largest component along the
inputs' common direction, so one code takes every token, and the codebook loss moves it at
Adam's ~1e-3 per step, far too slowly to reach the data. The decoder then sees a constant, its
straight-through gradient keeps pushing the encoder the same way, and |z| runs away (30 -> 2e4
in 100 steps) with the commitment term: the loss climbs from 2e4 to 2e8 as a consequence.
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
    "expect": "scale-mismatch",
    "onset": 0,
    "library": "diffusers",
    "family": "vq",
    "K": 16384, "D": 4, "tokens_per_step": 1024, "steps": 100,
    "launch": "python",
    "fault": "images in 0..255 (normalisation missing): |z| ~ 1e2 against uniform(+-1/K) codes, |e| ~ 1e-4",
}
K, D, BATCH, STEPS = 16384, 4, 16, 100


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, D, 3, 1, 1))
        self.quantize = VectorQuantizer(K, D, beta=0.25, legacy=False)
        self.decoder = nn.Sequential(nn.Conv2d(D, 32, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(32, 3, 4, 2, 1))

    def forward(self, x):
        z = self.encoder(x)
        z_q, vq_loss, (_, _, idx) = self.quantize(z)
        return self.decoder(z_q), vq_loss, idx.flatten(), z


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
    g = torch.Generator().manual_seed(12000 + args.seed)

    def batch(n):  # 8-bit "photos": smooth fields in 0..255 (THE BUG: never mapped to [-1, 1])
        f = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear", align_corners=False)
        return (127.5 + 60.0 * f).clamp(0, 255).round()

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, vq_loss, idx, z = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == STEPS - 1:
            e = model.quantize.embedding.weight
            print(f"step {step:4d} loss {loss.item():.4g} |z| median {z.detach().flatten(2).norm(dim=1).median():.4g} "
                  f"|e| median {e.norm(dim=1).median():.3g} perplexity {perplexity(idx, K):6.2f} "
                  f"used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(1024)).permute(0, 2, 3, 1).reshape(-1, D)  # 65536 vectors = 4 K
        idx = torch.cat([torch.cdist(c, model.quantize.embedding.weight).argmin(1) for c in z.split(2048)])
    print(f"held-out: perplexity {perplexity(idx, K):.2f} used {idx.unique().numel()}/{K}; time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
