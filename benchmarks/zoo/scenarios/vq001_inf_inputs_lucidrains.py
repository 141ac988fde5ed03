"""VQ001 non-finite: -inf in the inputs from step 60 on (vector-quantize-pytorch `VectorQuantize`).

The features are log-energies (as in log-mel front ends): `log(energy)` with no floor. From step
60 the loader reaches a shard with digitally silent frames (energy exactly 0, 1% of frames), so
those rows are -inf. The encoder turns them into NaN, the NaN rows enter the k-means-initialised
EMA codebook through `embed_avg`, and the codebook, the quantized outputs and the loss all turn
NaN. Realistic: a missing `log(x + eps)` / `clamp_min` is the classic source of inf features.
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
    "expect": "non-finite",
    "onset": 60,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 1024, "D": 16, "tokens_per_step": 4096, "steps": 150,
    "launch": "python",
    "fault": "log(energy) features without a floor: silent frames give -inf inputs from step 60",
}
K, D, IN, BATCH, STEPS, ONSET = 1024, 16, 40, 4096, 150, 60


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 64), nn.GELU(), nn.Linear(64, D))
        self.vq = VectorQuantize(dim=D, codebook_size=K, decay=0.9, kmeans_init=True,
                                 threshold_ema_dead_code=2, commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, IN))

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
    g = torch.Generator().manual_seed(8000 + args.seed)
    mix = torch.rand(8, IN, generator=g)  # 8 "sources" with their own spectral envelopes

    def energies(n, silent=0.0):
        w = torch.rand(n, 8, generator=g) ** 3
        e = (w @ mix) * torch.exp(0.3 * torch.randn(n, IN, generator=g))
        e[torch.rand(n, generator=g) < silent] = 0.0  # digitally silent frames
        return e

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = torch.log(energies(BATCH, silent=0.01 if step >= ONSET else 0.0))  # THE BUG: no floor
        recon, commit, idx = model(x)
        finite = torch.isfinite(x).all(1)
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step in (ONSET, ONSET + 1) or step == STEPS - 1:
            cb = model.vq._codebook.embed
            print(f"step {step:4d} loss {loss.item():.4g} non-finite inputs {int((~finite).sum())} "
                  f"non-finite codebook rows {int((~torch.isfinite(cb).all(-1)).sum())}/{K} "
                  f"perplexity {perplexity(idx, K):7.1f}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(torch.log(energies(4 * K, silent=0.01)))
    print(f"probe: {int((~torch.isfinite(z).all(1)).sum())}/{z.shape[0]} non-finite rows; time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
