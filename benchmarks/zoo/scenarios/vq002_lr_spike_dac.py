"""VQ002 loss-divergence: SGD learning rate 10x too high from step 50, no clipping (transformers DAC RVQ).

transformers' `DacResidualVectorQuantizer` (3 codebooks of 2048 codes, factorised 8-d l2-normalised
lookup, gradient-trained codebooks, commitment 0.25 + codebook loss 1.0) inside a small 1-d conv
codec on synthetic audio, trained with SGD momentum 0.9 at lr 0.02. A two-phase schedule switches
at step 50 to the "full training" learning rate, typed 0.2 instead of 0.02 (a LambdaLR returning
10); there is no gradient clipping, so the momentum SGD amplifies the gradient step after step:
loss 0.84 -> 0.97 -> 2.6 -> 18 -> 9e4 -> inf (step 55) -> NaN, gradient norm 0.27 -> 3e6 -> NaN.
(A 100x jump goes straight to NaN in two steps, with no growth phase to see.)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DacConfig
from transformers.models.dac.modeling_dac import DacResidualVectorQuantizer

SCENARIO = {
    "expect": "loss-divergence",
    "onset": 50,
    "library": "transformers",
    "family": "rvq",
    "K": 2048, "D": 8, "tokens_per_step": 512, "steps": 120,
    "launch": "python",
    "fault": "SGD momentum 0.9, lr 0.02 -> 0.2 at step 50 (second schedule phase typed 10x), no clipping; NaN from step 55",
}
K, D, HID, Q, BATCH, T, STEPS, ONSET = 2048, 8, 64, 3, 16, 128, 120, 50


class Codec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(1, 32, 4, 2, 1), nn.ELU(), nn.Conv1d(32, 64, 4, 2, 1), nn.ELU(),
                                     nn.Conv1d(64, HID, 3, 1, 1))
        cfg = DacConfig(hidden_size=HID, n_codebooks=Q, codebook_size=K, codebook_dim=D, quantizer_dropout=0.0)
        self.quantizer = DacResidualVectorQuantizer(cfg)
        self.decoder = nn.Sequential(nn.Conv1d(HID, 64, 3, 1, 1), nn.ELU(), nn.ConvTranspose1d(64, 32, 4, 2, 1),
                                     nn.ELU(), nn.ConvTranspose1d(32, 1, 4, 2, 1))

    def forward(self, x):
        q, codes, _, commitment, codebook = self.quantizer(self.encoder(x))
        return self.decoder(q), 0.25 * commitment.mean() + codebook.mean(), codes


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
    g = torch.Generator().manual_seed(11000 + args.seed)
    t = torch.arange(T).float()

    def batch(n):  # mono "audio": 4 random sinusoids with a random envelope
        f = torch.rand(n, 4, 1, generator=g) * 0.6
        ph = torch.rand(n, 4, 1, generator=g) * 6.283
        return ((torch.rand(n, 1, 1, generator=g) + 0.2) * torch.sin(f * t + ph)).sum(1, keepdim=True)

    model = Codec()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < ONSET else 10.0)  # THE BUG: meant 1.0
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, vq_loss, codes = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measured, not clipped
        opt.step()
        sched.step()
        if step % 10 == 0 or ONSET <= step <= ONSET + 12 or step == STEPS - 1:
            print(f"step {step:4d} lr {opt.param_groups[0]['lr']:.2g} loss {loss.item():.4g} grad norm {gnorm:.3g} "
                  f"perplexity (codebook 0) {perplexity(codes[:, 0], K):6.1f}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        h = model.encoder(batch(256))  # [256, HID, 32]: 8192 vectors = 4 K
    print(f"held-out: non-finite encoder outputs {int((~torch.isfinite(h)).sum())}; time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(h.transpose(1, 2).reshape(-1, HID), out / "probe.pt")


if __name__ == "__main__":
    main()
