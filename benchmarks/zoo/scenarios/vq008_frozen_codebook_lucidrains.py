"""Frozen codebook: EMA decay 1.0 on a vector-quantize-pytorch codebook.

Fault: `VectorQuantize(decay=1.0)`: the config meant "no decay of the learning rate" or
confused the EMA decay with `1 - decay`. The EMA update is `old.lerp_(new, 1 - decay)`, a
no-op at decay 1.0: after the k-means init on the first batch the codebook never moves again.
The encoder keeps training, so its outputs drift away from the fixed k-means centroids of the
random-init encoder, and fewer and fewer codes are nearest to anything. EMA counts are frozen
too (they still hold the k-means bin sizes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "frozen-codebook",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 256, "D": 32, "tokens_per_step": 4096, "steps": 200,
    "launch": "python",
    "fault": "EMA decay 1.0: the codebook never moves after k-means init",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 20, dim: int = 32, K: int = 256):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, dim))
        self.vq = VectorQuantize(dim=dim, codebook_size=K, decay=1.0, kmeans_init=True,  # BUG: decay=1.0
                                 commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, idx, commit = self.vq(z)
        return self.decoder(q), commit, idx, z


def batch(mix: torch.Tensor, g: torch.Generator, n: int = 4096) -> torch.Tensor:
    s = torch.randn(1, n, mix.shape[0], generator=g)
    return 3 * torch.tanh(s @ mix)  # [1, n, 20], 8 latent factors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=88)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    mix = torch.randn(8, 20, generator=g) / 8 ** 0.5
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    e_init = None
    for step in range(SCENARIO["steps"]):
        x = batch(mix, g)
        recon, commit, idx, z = model(x)
        loss = F.mse_loss(recon, x) + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if e_init is None:
            e_init = model.vq.codebook.detach().clone()  # right after the k-means init
        if step == 40:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 40 == 0 or step == SCENARIO["steps"] - 1:
            drift = (model.vq.codebook - e_init).abs().max().item()
            print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():3d}/256 "
                  f"max |e - e_kmeans| {drift:.3g}, |z| median {z.norm(dim=-1).median().item():.3g}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(batch(mix, g, n=2048))[0]  # 2048 held-out vectors = 8 K
    torch.save(z, out / "probe.pt")
    cb = model.vq._codebook
    print(f"mechanism: codebook bit-identical to the k-means init after {SCENARIO['steps']} steps: "
          f"{torch.equal(model.vq.codebook, e_init)}; EMA counts sum {cb.cluster_size.sum().item():.0f} "
          f"(the k-means bins of step 0); code norm median {model.vq.codebook.norm(dim=-1).median().item():.3g} "
          f"vs |z| median {z.norm(dim=-1).median().item():.3g}")


if __name__ == "__main__":
    main()
