"""VQ003 scale-mismatch: encoder output norm grows without bound in front of a cosine EMA codebook.

vector-quantize-pytorch `VectorQuantize(use_cosine_sim=True)` (unit-norm codes tracked by EMA,
k-means init) with `commitment_weight=0` and no `layernorm_after_project_in`. The lookup and the
straight-through gradient see only z / |z|, so the gradient reaching the encoder output is
orthogonal to z and nothing pulls |z| back: every update makes it longer (lucidrains #26: "the
l2-norm of the input to the vq module would grow gradually, from 22 -> 20000"). As |z| grows the
encoder's gradient shrinks as 1/|z|, so it learns ever more slowly. Adam at lr 1e-2 on a 64-d MLP
encoder makes the growth visible in 300 steps: median |z| 1.9 -> 41 against unit-norm codes, still
rising at the end (the reconstruction has not degraded yet in so short a run). No dead-code
replacement (the library default), so codes the drifting encoder leaves behind stay dead (768 of
1024 by the end): a side effect, not the fault.
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
    "expect": "scale-mismatch",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 1024, "D": 64, "tokens_per_step": 2048, "steps": 300,
    "launch": "python",
    "fault": "cosine EMA codebook, commitment_weight=0, no LayerNorm after project_in: |z| grows without bound",
}
K, D, IN, BATCH, STEPS = 1024, 64, 32, 2048, 300


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 128), nn.GELU(), nn.Linear(128, D))
        self.vq = VectorQuantize(dim=D, codebook_size=K, use_cosine_sim=True, commitment_weight=0.0,
                                 kmeans_init=True, decay=0.9)
        self.decoder = nn.Sequential(nn.Linear(D, 128), nn.GELU(), nn.Linear(128, IN))

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
    g = torch.Generator().manual_seed(13000 + args.seed)
    centres = torch.randn(256, IN, generator=g)

    def batch(n):  # Gaussian mixture, 256 components
        return centres[torch.randint(0, 256, (n,), generator=g)] + 0.3 * torch.randn(n, IN, generator=g)

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == STEPS - 1:
            with torch.no_grad():
                zn = model.encoder(x).norm(dim=1).median()
            print(f"step {step:4d} loss {loss.item():.4f} |z| median {zn:.4g} perplexity {perplexity(idx, K):6.1f} "
                  f"used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(4 * K))
    print(f"held-out |z| median {z.norm(dim=1).median():.4g} (codes: unit norm); time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
