"""Healthy LFQ: vector-quantize-pytorch `LFQ`, 2^10 codes, with its entropy loss.

An MLP autoencoder on 48-d data from a 10-d Gaussian latent. The encoder ends in 10 channels
normalised by BatchNorm (affine=False; a normalisation before LFQ, lucidrains PR #89) and LFQ
takes the sign of each (a 1024-code implicit codebook); its auxiliary loss (weight 0.1, diversity
gamma 1) lowers the per-token entropy and raises the batch entropy, so the bits stay balanced and
codes are spread (Yu et al. 2023, MAGVIT-v2). Nothing is wrong.

(Without the normalisation, a 64 -> 12 projection inside LFQ lets the encoder output grow, the
soft assignments saturate and usage falls from ~800 to ~500 codes per step within 300 steps.)

Note: `final.pt` holds LFQ's `mask` buffer (powers of two, whose length gives K = 2^10); the
codebook itself is implicit.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import LFQ

SCENARIO = {
    "expect": "healthy",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "lfq",
    "K": 1024, "D": 10, "tokens_per_step": 1024, "steps": 300,
    "launch": "python",
    "fault": "none: LFQ 2^10 with entropy loss 0.1 after a BatchNorm",
}
K, IN, RANK, BATCH, STEPS = 1024, 48, 10, 1024, 300


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 128), nn.GELU(), nn.Linear(128, 10),
                                     nn.BatchNorm1d(10, affine=False))
        self.lfq = LFQ(dim=10, codebook_size=K, entropy_loss_weight=0.1, diversity_gamma=1.0)
        self.decoder = nn.Sequential(nn.Linear(10, 128), nn.GELU(), nn.Linear(128, IN))

    def forward(self, x):
        q, idx, aux = self.lfq(self.encoder(x).unsqueeze(0))
        return self.decoder(q.squeeze(0)), aux, idx.flatten()


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
    g = torch.Generator().manual_seed(5000 + args.seed)
    basis = torch.randn(RANK, IN, generator=g) / math.sqrt(RANK)

    def batch(n):
        return torch.randn(n, RANK, generator=g) @ basis + 0.05 * torch.randn(n, IN, generator=g)

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, aux, idx = model(x)
        loss = F.mse_loss(recon, x) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d} loss {loss.item():.4f} aux {aux.item():+.4f} perplexity "
                  f"{perplexity(idx, K):7.1f} used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(4 * K))
        idx = model.lfq(z.unsqueeze(0))[1].flatten()
    bits = ((idx[:, None] >> torch.arange(10)) & 1).float().mean(0)
    print(f"held-out ({4 * K} vectors): perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K} "
          f"bit balance {bits.min():.2f}..{bits.max():.2f} time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
