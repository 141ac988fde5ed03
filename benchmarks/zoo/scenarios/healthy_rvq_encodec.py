"""Healthy residual VQ: encodec `core_vq.ResidualVectorQuantization` with k-means init.

A 1-d conv autoencoder on synthetic "audio" (sums of a few random sinusoids, 2 channels, 256
samples, 4x downsampled to 64 frames). Four residual EMA codebooks of 64 codes, k-means init (20
iterations) on the first batch and encodec's dead-code expiry at an EMA count of 2 (16 expected
hits per code and step). Commitment weight 1. EMA decay 0.9: encodec's k-means init stores the
centroids (not centroid x count) in `embed_avg`, so the first EMA updates shrink every code
towards the origin; with decay 0.99 they need ~100 steps to recover and the first layer loses
most of its codes meanwhile, with 0.9 it recovers in ~20 steps. (With 128 codes the first layer's
data, which span ~5 dimensions, leave a third of the codes unused: encodec's expiry cannot revive
them, encodec #61.)
Nothing is wrong.

encodec's package __init__ imports torchaudio for audio I/O the quantizer never uses; a
placeholder module stands in during the import (torchaudio does not load beside a CPU torch here).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.modules["torchaudio"] = types.ModuleType("torchaudio")
from encodec.quantization import core_vq  # noqa: E402

del sys.modules["torchaudio"]

SCENARIO = {
    "expect": "healthy",
    "onset": 0,
    "library": "encodec",
    "family": "rvq",
    "K": 64, "D": 32, "tokens_per_step": 1024, "steps": 250,
    "launch": "python",
    "fault": "none: 4 residual EMA codebooks, k-means init, decay 0.9, expiry at 2 with 16 tokens per code",
}
K, D, Q, BATCH, T, STEPS = 64, 32, 4, 16, 256, 250


class Codec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(2, 32, 4, 2, 1), nn.ELU(), nn.Conv1d(32, 32, 4, 2, 1), nn.ELU(),
                                     nn.Conv1d(32, D, 3, 1, 1))
        self.quantizer = core_vq.ResidualVectorQuantization(num_quantizers=Q, dim=D, codebook_size=K, decay=0.9,
                                                            kmeans_init=True, kmeans_iters=20,
                                                            threshold_ema_dead_code=2)
        self.decoder = nn.Sequential(nn.Conv1d(D, 32, 3, 1, 1), nn.ELU(), nn.ConvTranspose1d(32, 32, 4, 2, 1),
                                     nn.ELU(), nn.ConvTranspose1d(32, 2, 4, 2, 1))

    def forward(self, x):
        q, codes, commit = self.quantizer(self.encoder(x))  # codes [Q, B, T']
        return self.decoder(q), commit.sum(), codes


def perplexity(idx: torch.Tensor, k: int) -> float:
    p = torch.bincount(idx.flatten(), minlength=k).float() / idx.numel()
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
    g = torch.Generator().manual_seed(3000 + args.seed)
    t = torch.arange(T).float()

    def batch(n):  # 3 sinusoids per channel, random frequency / phase / amplitude
        f = torch.rand(n, 2, 3, 1, generator=g) * 0.5
        ph = torch.rand(n, 2, 3, 1, generator=g) * 6.283
        a = torch.rand(n, 2, 3, 1, generator=g)
        return (a * torch.sin(f * t + ph)).sum(2)

    model = Codec()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, commit, codes = model(x)
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            ppl = " ".join(f"{perplexity(c, K):5.1f}" for c in codes)
            print(f"step {step:4d} loss {loss.item():.4f} perplexity per layer {ppl}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(64))  # [64, D, 64]: 4096 vectors = 64 K
        codes = model.quantizer.encode(z)
    ppl = " ".join(f"{perplexity(c, K):.1f}" for c in codes)
    print(f"held-out: perplexity per layer {ppl} time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z.transpose(1, 2).reshape(-1, D), out / "probe.pt")


if __name__ == "__main__":
    main()
