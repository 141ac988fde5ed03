"""VQ002 loss-divergence: the learning rate jumps 100x at step 100, no clipping (diffusers `VectorQuantizer`).

The healthy recipe of `healthy_vq_diffusers.py` (data-seeded codebook, Adam lr 1e-3 for the nets
and 1e-2 for the codebook, beta 0.25, non-legacy loss), with a schedule typo: the step decay at
step 100 was meant to divide the learning rate by 100, but `MultiStepLR`'s gamma is a multiplier
and was written `gamma=100`. From step 100 the nets train at lr 0.1 and the codebook at 1.0, with
no gradient clipping: the loss jumps from ~0.4 to ~10^3-10^4 within a few steps, the gradient
norm by 10^4, the encoder output norm by 50x, and usage collapses.
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
    "expect": "loss-divergence",
    "onset": 100,
    "library": "diffusers",
    "family": "vq",
    "K": 1024, "D": 8, "tokens_per_step": 1024, "steps": 200,
    "launch": "python",
    "fault": "MultiStepLR gamma=100 (meant 0.01): lr x100 at step 100 (Adam 0.1, codebook 1.0), no clipping",
}
K, D, BATCH, STEPS, ONSET = 1024, 8, 16, 200, 100


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
    g = torch.Generator().manual_seed(10000 + args.seed)

    def batch(n):  # smooth random images with structure at two scales
        coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear")
        return coarse + 0.3 * F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=16, mode="bilinear")

    model = AE()
    with torch.no_grad():  # data-dependent codebook init (1024 distinct encoder outputs)
        z = model.encoder(batch(BATCH)).permute(0, 2, 3, 1).reshape(-1, D)
        model.quantize.embedding.weight.copy_(z[torch.randperm(z.shape[0])[:K]])
    nets = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.Adam([{"params": nets}, {"params": model.quantize.parameters(), "lr": 1e-2}], lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[ONSET], gamma=100.0)  # THE BUG: meant 0.01
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, vq_loss, idx = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measured, not clipped
        opt.step()
        sched.step()
        if step % 10 == 0 or step in (ONSET, ONSET + 1, ONSET + 2, ONSET + 5) or step == STEPS - 1:
            print(f"step {step:4d} lr {opt.param_groups[0]['lr']:.0e} loss {loss.item():.4g} grad norm {gnorm:.3g} "
                  f"perplexity {perplexity(idx, K):6.1f} |z| {model.encoder(x).norm(dim=1).median():.3g}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(64)).permute(0, 2, 3, 1).reshape(-1, D)  # 4096 vectors = 4 K
    print(f"held-out: |z| median {z.norm(dim=1).median():.3g}, code norm median "
          f"{model.quantize.embedding.weight.norm(dim=1).median():.3g}; time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
