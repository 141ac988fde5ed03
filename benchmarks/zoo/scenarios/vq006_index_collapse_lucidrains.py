"""Index collapse: a saturated sigmoid encoder head maps every input to one or two points.

Fault: the images are fed to the encoder as raw 0-255 pixel values (the `/ 255` was applied to
the reconstruction target only). The encoder ends in a sigmoid; with inputs that large its
pre-activations are in the hundreds and share one sign pattern (the mean pixel dominates), so
the sigmoid saturates: almost every input lands on the same corner of the 16-d hypercube, and
the saturated sigmoid passes no gradient, so the encoder never recovers. The quantizer
(vector-quantize-pytorch EMA, healthy settings) faithfully assigns that one point to one code.
The collapse is the root cause here: the encoder output itself collapsed; codebook, EMA
statistics and straight-through path are all fine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "index-collapse",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 256, "D": 16, "tokens_per_step": 1024, "steps": 200,
    "launch": "python",
    "fault": "raw 0-255 inputs saturate the encoder's sigmoid head: encoder output collapses to a point",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 48, dim: int = 16, K: int = 256):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, dim), nn.Sigmoid())
        self.vq = VectorQuantize(dim=dim, codebook_size=K, decay=0.8, kmeans_init=True,
                                 commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, idx, commit = self.vq(z)
        return self.decoder(q), commit, idx, z


def patches(basis: torch.Tensor, g: torch.Generator, n: int = 1024) -> torch.Tensor:
    """[1, n, 48] 4x4x3 'pixel' patches in 0..255: 6 latent factors around mid-grey."""
    s = torch.randn(1, n, basis.shape[0], generator=g)
    return (128 + 40 * s @ basis).clamp(0, 255).round()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    basis = torch.randn(6, 48, generator=g) / 6 ** 0.5
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(SCENARIO["steps"]):
        x = patches(basis, g)
        recon, commit, idx, z = model(x)  # BUG: should be model(x / 255)
        loss = F.mse_loss(recon, x / 255) + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 50:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 50 == 0 or step == SCENARIO["steps"] - 1:
            pre = model.encoder[:3](x)
            sat = ((pre.abs() > 10).float().mean()).item()
            print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():3d}/256 "
                  f"sigmoid saturated (|pre| > 10): {sat:.1%}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(patches(basis, g, n=2048))[0]  # 2048 held-out vectors = 8 K
    torch.save(z, out / "probe.pt")
    spread = (z - z.mean(0)).norm(dim=-1).median() / z.norm(dim=-1).median()
    print(f"mechanism: encoder outputs collapsed: median |z - mean z| / median |z| = {spread.item():.2e}; "
          f"distinct rows among 2048 held-out z: {torch.unique(z.round(decimals=4), dim=0).shape[0]}; "
          f"sigmoid gradient at the median pre-activation {torch.sigmoid(model.encoder[:3](patches(basis, g))).mul(1 - torch.sigmoid(model.encoder[:3](patches(basis, g)))).median().item():.2e}")


if __name__ == "__main__":
    main()
