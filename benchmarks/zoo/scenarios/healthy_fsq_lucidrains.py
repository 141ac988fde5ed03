"""Healthy FSQ: vector-quantize-pytorch `FSQ` with levels [7, 5, 5, 5, 5] (4375 codes).

An MLP autoencoder on 64-d data generated from 5 independent uniform factors (a random linear
embedding plus noise). FSQ projects the 64-d encoder output to 5 bounded scalars and rounds each
to its levels: no codebook to learn, no auxiliary loss (Mentzer et al. 2023 recommend these
levels for ~2^12 codes). Nothing is wrong: every level of every dimension is used.

Note: `final.pt` holds only FSQ's projections (levels are not stored), so a checkpoint reader
needs the levels from the user (`--quantizer fsq --levels 7,5,5,5,5`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ

LEVELS = [7, 5, 5, 5, 5]
SCENARIO = {
    "expect": "healthy",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "fsq",
    "K": 4375, "D": 5, "tokens_per_step": 4096, "steps": 300,
    "launch": "python",
    "fault": "none: FSQ levels [7, 5, 5, 5, 5] behind a 64 -> 5 projection",
    "inspect_args": ["--quantizer", "fsq", "--levels", "7,5,5,5,5"],
}
K, IN, BATCH, STEPS = math.prod(LEVELS), 64, 4096, 300


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 128), nn.GELU(), nn.Linear(128, 64))
        self.fsq = FSQ(levels=LEVELS, dim=64)
        self.decoder = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, IN))

    def forward(self, x):
        q, idx = self.fsq(self.encoder(x).unsqueeze(0))
        return self.decoder(q.squeeze(0)), idx.flatten()


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
    g = torch.Generator().manual_seed(4000 + args.seed)
    basis = torch.randn(5, IN, generator=g) / 2

    def batch(n):  # 5 uniform factors, linearly embedded in 64-d
        return (torch.rand(n, 5, generator=g) * 2 - 1) @ basis + 0.02 * torch.randn(n, IN, generator=g)

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, idx = model(x)
        loss = F.mse_loss(recon, x)
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
        idx = model.fsq(z.unsqueeze(0))[1].flatten()
        levels = model.fsq.indices_to_level_indices(idx)
    for j in range(len(LEVELS)):
        print(f"held-out level use, dim {j}: {torch.bincount(levels[:, j].long(), minlength=LEVELS[j]).tolist()}")
    print(f"held-out ({4 * K} vectors): perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K} "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
