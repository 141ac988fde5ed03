"""VQ001 non-finite: NaN inputs from per-clip normalisation of silent clips (encodec core_vq RVQ).

The loader normalises every clip to unit RMS, `x / x.std()`, with no epsilon. From step 40 it
reaches a shard in which 1 clip in 16 is digitally silent (all zeros): 0 / 0 = NaN for the whole
clip. The NaN frames go through the encoder into encodec's `ResidualVectorQuantization` (3 stages
of 128 codes, k-means init, decay 0.9), whose EMA update adds them into `embed_avg`
(`x.t() @ onehot`), so the codebooks, the reconstruction and the loss are NaN from then on.

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
    "expect": "non-finite",
    "onset": 40,
    "library": "encodec",
    "family": "rvq",
    "K": 128, "D": 16, "tokens_per_step": 1024, "steps": 120,
    "launch": "python",
    "fault": "clips normalised by x / x.std() without eps: silent clips from step 40 give NaN inputs",
}
K, D, Q, BATCH, T, STEPS, ONSET = 128, 16, 3, 16, 256, 120, 40


class Codec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(1, 32, 4, 2, 1), nn.ELU(), nn.Conv1d(32, 32, 4, 2, 1), nn.ELU(),
                                     nn.Conv1d(32, D, 3, 1, 1))
        self.quantizer = core_vq.ResidualVectorQuantization(num_quantizers=Q, dim=D, codebook_size=K, decay=0.9,
                                                            kmeans_init=True, kmeans_iters=20,
                                                            threshold_ema_dead_code=0)
        self.decoder = nn.Sequential(nn.Conv1d(D, 32, 3, 1, 1), nn.ELU(), nn.ConvTranspose1d(32, 32, 4, 2, 1),
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
    g = torch.Generator().manual_seed(20000 + args.seed)
    t = torch.arange(T).float()

    def batch(n, silent=0.0):  # mono "audio" clips, normalised to unit RMS
        f = torch.rand(n, 3, 1, generator=g) * 0.5
        ph = torch.rand(n, 3, 1, generator=g) * 6.283
        x = ((torch.rand(n, 3, 1, generator=g) + 0.1) * torch.sin(f * t + ph)).sum(1, keepdim=True)
        x[torch.rand(n, generator=g) < silent] = 0.0  # digitally silent clips
        return x / x.std(dim=-1, keepdim=True)  # THE BUG: no epsilon, 0 / 0 = NaN

    model = Codec()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    embeds = [layer._codebook.embed for layer in model.quantizer.layers]
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH, silent=1 / 16 if step >= ONSET else 0.0)
        recon, commit, codes = model(x)
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or ONSET <= step <= ONSET + 2 or step == STEPS - 1:
            bad_in = int((~torch.isfinite(x).all(-1)).sum())
            bad_rows = " ".join(str(int((~torch.isfinite(e).all(1)).sum())) for e in embeds)
            ppl = " ".join(f"{perplexity(c, K):5.1f}" for c in codes)
            print(f"step {step:4d} loss {loss.item():.4g} NaN clips {bad_in}/{BATCH} non-finite code rows per "
                  f"stage {bad_rows} perplexity per stage {ppl}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(128, silent=1 / 16))  # [128, D, 64]: 8192 vectors = 64 K
    print(f"probe: {int((~torch.isfinite(z)).any(1).sum())}/{z.shape[0] * z.shape[2]} non-finite vectors; "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z.transpose(1, 2).reshape(-1, D), out / "probe.pt")


if __name__ == "__main__":
    main()
