"""VQ004 ema-divergence: EMA buffers in bfloat16 stall (vector-quantize-pytorch `VectorQuantize`, decay 0.999).

"Pure bf16" training (what Lightning's `precision="bf16-true"` does): the whole model, buffers
included, is cast with `model.to(torch.bfloat16)`, so the quantizer's `cluster_size`, `embed_avg`
and `embed` are bfloat16. With decay 0.999 an EMA step changes a value by 0.001 x (new - old),
while bfloat16 resolves only ~0.4% of the value: unless the new batch statistic differs from the
average by more than ~2x, the update rounds away and the average stays put (research note: bf16
`x <- 0.999 x + 0.001 * 2` from 1 stays at 1.0000 for 5000 steps). The codebook stays near its
k-means init while the encoder moves: codes strand and usage falls. Measured each step: the
fraction of codes whose count did not change at all although they were selected.
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
    "expect": "ema-divergence",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 256, "D": 32, "tokens_per_step": 2048, "steps": 250,
    "launch": "python",
    "fault": "model.to(bfloat16) incl. EMA buffers, decay 0.999: EMA updates round away, the codebook stalls",
}
K, D, IN, BATCH, STEPS = 256, 32, 24, 2048, 250


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 96), nn.GELU(), nn.Linear(96, D))
        self.vq = VectorQuantize(dim=D, codebook_size=K, decay=0.999, kmeans_init=True, commitment_weight=0.25)
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
    g = torch.Generator().manual_seed(19000 + args.seed)
    basis = torch.randn(8, IN, generator=g) / math.sqrt(8)

    def batch(n):  # low-rank data: an 8-d Gaussian latent in 24-d, plus noise
        return (torch.randn(n, 8, generator=g) @ basis + 0.05 * torch.randn(n, IN, generator=g)).bfloat16()

    model = AE().to(torch.bfloat16)  # THE BUG: the EMA buffers go to bfloat16 with everything else
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cb = model.vq._codebook
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        counts_before = cb.cluster_size.detach().clone()
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon.float(), x.float()) + commit.float()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (1, 2) or step % 25 == 0 or step == STEPS - 1:
            hit = torch.zeros(K, dtype=torch.bool)
            hit[idx] = True
            stuck = (cb.cluster_size.flatten() == counts_before.flatten()) & hit
            print(f"step {step:4d} loss {loss.item():.4f} perplexity {perplexity(idx, K):6.1f} used "
                  f"{idx.unique().numel()}/{K}; selected codes whose count did not move: {int(stuck.sum())}/"
                  f"{int(hit.sum())}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(16 * K))  # 4096 vectors = 16 K
        idx = model.vq(z.unsqueeze(0))[1].flatten()
    print(f"held-out: perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K}; time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z.float(), out / "probe.pt")


if __name__ == "__main__":
    main()
