"""Dead codes: a random high-dimensional codebook against data on a 4-d subspace, no k-means.

Fault: `VectorQuantize(dim=64, codebook_size=1024)` with the library defaults (random
isotropic 64-d init, no `kmeans_init`, no dead-code replacement) quantizes encoder outputs
that live on a 4-dimensional manifold (the data have 4 degrees of freedom). Only the few codes
whose random direction happens to point into that manifold are ever nearest to an input; the
rest receive no EMA mass, their counts decay as 0.8^t and they drift to the origin. The EMA
codebook follows the data, so the scales of codes in use and inputs match: nothing but the
init/data geometry is wrong. Realistic: the default settings of a popular library on
low-intrinsic-dimension features (speech frames, image patches), cf. lucidrains #205.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "dead-codes",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 1024, "D": 64, "tokens_per_step": 2048, "steps": 250,
    "launch": "python",
    "fault": "random 64-d codebook (no k-means init, no replacement) vs encoder outputs on a 4-d manifold",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 32, dim: int = 64, K: int = 1024):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 128), nn.GELU(), nn.Linear(128, dim))
        self.vq = VectorQuantize(dim=dim, codebook_size=K, decay=0.8, commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, idx, commit = self.vq(z)
        return self.decoder(q), commit, idx, z


def batch(mix: torch.Tensor, g: torch.Generator, n: int = 16, t: int = 128) -> torch.Tensor:
    """x = tanh(s A) for a 4-d latent s: 32-d observations with 4 degrees of freedom."""
    s = torch.randn(n, t, mix.shape[0], generator=g)
    return torch.tanh(s @ mix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    mix = torch.randn(4, 32, generator=g)
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cb = model.vq._codebook
    for step in range(SCENARIO["steps"]):
        x = batch(mix, g)
        recon, commit, idx, _ = model(x)
        loss = F.mse_loss(recon, x) + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 50:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 50 == 0 or step == SCENARIO["steps"] - 1:
            dead = (cb.cluster_size[0] < 1e-3).sum().item()
            print(f"step {step:4d} loss {loss.item():.4f} codes used in batch {idx.unique().numel():4d}/1024 "
                  f"ema count < 1e-3: {dead:4d}")
    torch.save(model.state_dict(), out / "final.pt")
    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(mix, g, n=64)).reshape(-1, 64)  # 8192 held-out vectors = 8 K
    torch.save(z, out / "probe.pt")
    sv = torch.linalg.svdvals(z - z.mean(0))
    norms = cb.embed[0].norm(dim=-1)
    live = cb.cluster_size[0] >= 1e-3
    print(f"mechanism: encoder outputs hold {(sv[:4].pow(2).sum() / sv.pow(2).sum()).item():.1%} of their variance "
          f"in 4 of 64 directions; median |z| {z.norm(dim=-1).median().item():.3g}, median |e| of live codes "
          f"{norms[live].median().item():.3g}; {int((~live).sum())} of 1024 codes have EMA count < 1e-3, "
          f"their median |e| {norms[~live].median().item():.2g}")


if __name__ == "__main__":
    main()
