"""Healthy VQ-EMA: vector-quantize-pytorch `VectorQuantize` with k-means init.

An MLP autoencoder on 48-d data that lies on a 12-d subspace (continuous, so every code has
something to cover). The codebook is initialised by k-means on the first batch, tracked by EMA
(decay 0.95) and dead codes are re-seeded below an EMA count of 2 (4 expected hits per code and
step). Commitment 0.25, Adam 1e-3. Nothing is wrong: usage stays high.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "healthy",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 512, "D": 32, "tokens_per_step": 2048, "steps": 250,
    "launch": "python",
    "fault": "none: k-means init, EMA decay 0.95, dead-code threshold 2 at 4 tokens per code",
}
K, D, IN, RANK, BATCH, STEPS = 512, 32, 48, 12, 2048, 250


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 96), nn.GELU(), nn.Linear(96, D))
        self.vq = VectorQuantize(dim=D, codebook_size=K, decay=0.95, kmeans_init=True,
                                 threshold_ema_dead_code=2, commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(D, 96), nn.GELU(), nn.Linear(96, IN))

    def forward(self, x):
        q, idx, commit = self.vq(self.encoder(x).unsqueeze(0))
        return self.decoder(q.squeeze(0)), commit, idx.flatten()


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

    g = torch.Generator().manual_seed(1000 + args.seed)
    basis = torch.randn(RANK, IN, generator=g) / math.sqrt(RANK)

    def batch(n):
        return torch.randn(n, RANK, generator=g) @ basis + 0.05 * torch.randn(n, IN, generator=g)

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d} loss {loss.item():.4f} perplexity {perplexity(idx, K):7.1f} "
                  f"used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(4 * K))
        idx = model.vq(z.unsqueeze(0))[1].flatten()
    print(f"held-out: perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K} "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
