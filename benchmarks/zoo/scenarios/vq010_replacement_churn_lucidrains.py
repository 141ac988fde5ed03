"""Replacement churn: dead-code threshold 16x the expected count per code; codes reset every step.

Fault: `threshold_ema_dead_code=2` (the SoundStream value, copied from an audio codec config
with 16x more tokens per step) on a codebook of 4096 codes fed 512 vectors per step. The
expected EMA count of a code is n/K = 0.125, so at any usage almost every code sits below the
threshold: each step, vector-quantize-pytorch replaces up to one code per input vector with a
fresh batch sample and resets its count to 2; the count decays (decay 0.8) below 2 within a
step unless the code is hit, and it is replaced again. The codebook never settles.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "replacement-churn",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 4096, "D": 16, "tokens_per_step": 512, "steps": 200,
    "launch": "python",
    "fault": "threshold_ema_dead_code=2 with tokens/step / K = 0.125: codes replaced every step",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 24, dim: int = 16, K: int = 4096):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 64), nn.GELU(), nn.Linear(64, dim))
        self.vq = VectorQuantize(dim=dim, codebook_size=K, decay=0.8, commitment_weight=0.25,
                                 threshold_ema_dead_code=2)  # BUG: 16x n/K = 0.125
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, idx, commit = self.vq(z)
        return self.decoder(q), commit, idx


def batch(centers: torch.Tensor, g: torch.Generator, n: int = 4, t: int = 128) -> torch.Tensor:
    c = torch.randint(len(centers), (n, t), generator=g)
    return centers[c] + 0.2 * torch.randn(n, t, centers.shape[1], generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(1024, 24, generator=g)
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cb = model.vq._codebook
    for step in range(SCENARIO["steps"]):
        x = batch(centers, g)
        before = cb.embed.detach().clone()
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon, x) + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 40:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 40 == 0 or step == SCENARIO["steps"] - 1:
            replaced = (cb.cluster_size[0] == 2.0).sum().item()
            jumped = ((cb.embed - before)[0].norm(dim=-1) > 0.5 * before[0].norm(dim=-1).median()).sum().item()
            print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():3d}/4096 "
                  f"codes reset this step (count == 2): {replaced}, rows that jumped: {jumped}, "
                  f"count mean (n/K) {cb.cluster_size.mean().item():.3g}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(batch(centers, g, n=128)).reshape(-1, 16)  # 16384 held-out vectors = 4 K
    torch.save(z, out / "probe.pt")
    print(f"mechanism: threshold 2 / expected count {512 / 4096} = {2 / (512 / 4096):.0f}x; "
          f"{(cb.cluster_size[0] < 2).sum().item()} of 4096 codes below the threshold at the end")


if __name__ == "__main__":
    main()
