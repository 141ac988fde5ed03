"""VQ004 ema-divergence: validation passes in training mode update encodec's EMA codebooks.

A 1-d conv codec with encodec `core_vq.ResidualVectorQuantization` (2 stages of 256 codes, k-means
init, decay 0.9, no dead-code expiry: encodec's own expiry is a no-op anyway, encodec #61). Every 20 steps a validation loop runs under `torch.no_grad()` but
the model is never switched to `eval()`: encodec's codebooks update their EMA statistics in any
forward made in training mode, so 10 validation batches (another domain: 4x louder, 2-3x higher
frequencies) overwrite a large part of the codebooks. Measured per validation: how far the codes
move compared with one training step, and the training perplexity right after. Onset 19: the
first validation runs after the optimizer step of step 19.

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
    "expect": "ema-divergence",
    "onset": 19,
    "library": "encodec",
    "family": "rvq",
    "K": 256, "D": 64, "tokens_per_step": 2048, "steps": 160,
    "launch": "python",
    "fault": "validation every 20 steps under no_grad without model.eval(): another domain updates the EMA codebooks",
}
K, D, Q, BATCH, T, STEPS, EVAL_EVERY, EVAL_BATCHES = 256, 64, 2, 32, 256, 160, 20, 10


class Codec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(1, 32, 4, 2, 1), nn.ELU(), nn.Conv1d(32, 64, 4, 2, 1), nn.ELU(),
                                     nn.Conv1d(64, D, 3, 1, 1))
        self.quantizer = core_vq.ResidualVectorQuantization(num_quantizers=Q, dim=D, codebook_size=K, decay=0.9,
                                                            kmeans_init=True, kmeans_iters=10,
                                                            threshold_ema_dead_code=0)
        self.decoder = nn.Sequential(nn.Conv1d(D, 64, 3, 1, 1), nn.ELU(), nn.ConvTranspose1d(64, 32, 4, 2, 1),
                                     nn.ELU(), nn.ConvTranspose1d(32, 1, 4, 2, 1))

    def forward(self, x):
        q, codes, commit = self.quantizer(self.encoder(x))
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
    g = torch.Generator().manual_seed(18000 + args.seed)
    t = torch.arange(T).float()

    def batch(n, gain=1.0, fmax=0.3):  # mono "audio": 4 random sinusoids with a random envelope
        f = torch.rand(n, 4, 1, generator=g) * fmax
        ph = torch.rand(n, 4, 1, generator=g) * 6.283
        return gain * ((torch.rand(n, 1, 1, generator=g) + 0.2) * torch.sin(f * t + ph)).sum(1, keepdim=True)

    val = [batch(BATCH, gain=4.0, fmax=0.9) for _ in range(EVAL_BATCHES)]  # another domain
    model = Codec()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    embeds = [layer._codebook.embed for layer in model.quantizer.layers]
    train_move = 0.0
    t0 = time.time()
    for step in range(STEPS):
        if step > 0 and step % EVAL_EVERY == 0:  # THE BUG: no model.eval() around validation
            before = [e.detach().clone() for e in embeds]
            with torch.no_grad():
                val_loss = sum(F.mse_loss(model(x)[0], x).item() for x in val) / len(val)
            moved = (embeds[0] - before[0]).norm(dim=-1).mean().item()
            print(f"  validation at step {step}: loss {val_loss:.3f}, stage-0 codes moved {moved:.3f} per code "
                  f"(one training step: {train_move:.4f})", flush=True)
        x = batch(BATCH)
        before = embeds[0].detach().clone()
        recon, commit, codes = model(x)
        train_move = (embeds[0] - before).norm(dim=-1).mean().item()
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVAL_EVERY in (0, 1) or step == STEPS - 1:
            ppl = " ".join(f"{perplexity(c, K):5.1f}" for c in codes)
            print(f"step {step:4d} loss {loss.item():.4f} perplexity per stage {ppl}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(64))  # training domain, [64, D, 64]: 4096 vectors = 16 K
        codes = model.quantizer.encode(z)
    ppl = " ".join(f"{perplexity(c, K):.1f}" for c in codes)
    print(f"held-out (training domain): perplexity per stage {ppl}; time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z.transpose(1, 2).reshape(-1, D), out / "probe.pt")


if __name__ == "__main__":
    main()
