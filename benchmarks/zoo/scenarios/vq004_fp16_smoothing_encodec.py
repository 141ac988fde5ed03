"""VQ004 ema-divergence: EMA buffers in float16, where Laplace smoothing underflows (encodec core_vq).

The quantizer (encodec `core_vq.VectorQuantization`, k-means init, eps 1e-5, decay 0.8 as in
audiocraft's `EuclideanCodebook` default) was cast to half precision with `.half()` to save
memory, so `cluster_size`, `embed_avg` and `embed` are float16 and its EMA update runs in float16.
Once an unused code's count has decayed below ~5e-5 (about 50 steps at decay 0.8), Laplace
smoothing computes `(count + 1e-5) / (n + K * 1e-5)` with n = 2048 tokens per step: ~1e-8, below
float16's smallest subnormal (6e-8), so it rounds to exactly 0 and `embed_avg / 0` writes +-inf
(0/0: NaN) into the codebook. Nearest-code search over an inf row gives NaN distances, `max` picks the NaN, and the
loss turns NaN (ZhikangNiu/encodec-pytorch #8, "AMP loss -> NaN", caused by laplace_smoothing).
The encoder and decoder stay in float32.

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
    "onset": 0,
    "library": "encodec",
    "family": "vq-ema",
    "K": 256, "D": 128, "tokens_per_step": 2048, "steps": 120,
    "launch": "python",
    "fault": "quantizer cast to float16: Laplace smoothing of unused codes underflows to 0, embed_avg / 0",
}
K, D, BATCH, T, STEPS = 256, 128, 32, 256, 120


class Codec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(1, 64, 4, 2, 1), nn.ELU(), nn.Conv1d(64, 64, 4, 2, 1), nn.ELU(),
                                     nn.Conv1d(64, D, 3, 1, 1))
        self.quantizer = core_vq.VectorQuantization(dim=D, codebook_size=K, decay=0.8, kmeans_init=True,
                                                    kmeans_iters=10, threshold_ema_dead_code=0).half()  # THE BUG
        self.decoder = nn.Sequential(nn.Conv1d(D, 64, 3, 1, 1), nn.ELU(), nn.ConvTranspose1d(64, 64, 4, 2, 1),
                                     nn.ELU(), nn.ConvTranspose1d(64, 1, 4, 2, 1))

    def forward(self, x):
        q, idx, commit = self.quantizer(self.encoder(x).half())
        return self.decoder(q.float()), commit.float().sum(), idx


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
    g = torch.Generator().manual_seed(9000 + args.seed)
    t = torch.arange(T).float()

    def batch(n):  # mono "audio": 4 random sinusoids with a random envelope
        f = torch.rand(n, 4, 1, generator=g) * 0.6
        ph = torch.rand(n, 4, 1, generator=g) * 6.283
        env = torch.rand(n, 1, 1, generator=g) + 0.2
        return (env * torch.sin(f * t + ph)).sum(1, keepdim=True)

    model = Codec()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cb = model.quantizer._codebook
    first_bad = None
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        bad = not torch.isfinite(cb.embed).all()
        if bad and first_bad is None:
            first_bad = step
        if step < 2 or step % 20 == 0 or step == STEPS - 1 or step == first_bad:
            n = cb.cluster_size.sum()
            smoothed = core_vq.laplace_smoothing(cb.cluster_size, K, cb.epsilon) * n
            print(f"step {step:4d} loss {loss.item():.4g} sum(count) {n.item():.0f} "
                  f"smoothed counts == 0: {int((smoothed == 0).sum())} "
                  f"non-finite codebook rows {int((~torch.isfinite(cb.embed).all(1)).sum())}/{K} "
                  f"perplexity {perplexity(idx, K):6.1f}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(32)).transpose(1, 2).reshape(-1, D)  # 2048 vectors = 8 K
    print(f"first non-finite codebook at step {first_bad}; float32 smoothing of a zero count: {((torch.tensor(0.) + 1e-5) / (2048 + K * 1e-5) * 2048).item():.2e}, "
          f"float16: {((torch.tensor(0., dtype=torch.half) + 1e-5) / (2048 + K * 1e-5) * 2048).item():.2e}; "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
