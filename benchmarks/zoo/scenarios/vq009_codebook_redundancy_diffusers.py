"""Codebook redundancy: data-dependent init copies many codes from the same few vectors.

Fault: to avoid the scale mismatch of taming's uniform(+-1/K) init, the codebook of a
diffusers `VectorQuantizer` is initialised from encoder outputs of the first batch, sampled
with replacement (`z[torch.randint(len(z), (K,))]`, as `sample_vectors` does in encodec and
vector-quantize-pytorch when a batch holds fewer vectors than codes). The first batch holds
256 vectors for 2048 codes, so ~1800 codes are exact copies of another. Of identical codes only
the first can win the argmin; the copies never receive a gradient, so they stay exact
duplicates for the whole run: most of the codebook is dead weight that looks alive by norm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import VectorQuantizer
from torch import nn

SCENARIO = {
    "expect": "codebook-redundancy",
    "onset": 0,
    "library": "diffusers",
    "family": "vq",
    "K": 2048, "D": 8, "tokens_per_step": 2048, "steps": 200,
    "launch": "python",
    "fault": "codebook initialised by sampling 2048 codes with replacement from 256 encoder outputs",
}


class VQAE(nn.Module):
    def __init__(self, c_in: int = 6, dim: int = 8, K: int = 2048):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(c_in, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, dim, 1))
        self.quantize = VectorQuantizer(K, dim, beta=0.25)
        self.decoder = nn.Sequential(nn.Conv2d(dim, 32, 1), nn.SiLU(), nn.Conv2d(32, c_in, 3, padding=1))

    def forward(self, x):
        z = self.encoder(x)
        z_q, vq_loss, (_, _, idx) = self.quantize(z)
        return self.decoder(z_q), vq_loss, idx


def fields(g: torch.Generator, n: int = 32, s: int = 8) -> torch.Tensor:
    """[n, 6, s, s] smooth multi-channel fields (sums of 3 random plane waves)."""
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    k = torch.randn(n, 6, 3, 2, 1, 1, generator=g) * 0.6
    ph = torch.rand(n, 6, 3, 1, 1, generator=g) * 6.28
    return torch.cos(k[:, :, :, 0] * xx + k[:, :, :, 1] * yy + ph).sum(2) / 3 ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    model = VQAE()
    K = SCENARIO["K"]
    with torch.no_grad():  # data-dependent init from the first batch of 4 samples = 256 vectors
        z0 = model.encoder(fields(g, n=4)).permute(0, 2, 3, 1).reshape(-1, 8)
        model.quantize.embedding.weight.copy_(z0[torch.randint(len(z0), (K,), generator=g)])  # BUG: K > 256
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(SCENARIO["steps"]):
        x = fields(g)
        recon, vq_loss, idx = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 40:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 40 == 0 or step == SCENARIO["steps"] - 1:
            w = model.quantize.embedding.weight
            distinct = torch.unique(w, dim=0).shape[0]
            print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():4d}/{K} "
                  f"distinct codebook rows {distinct}/{K}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(fields(g, n=256)).permute(0, 2, 3, 1).reshape(-1, 8)  # 16384 held-out = 8 K
    torch.save(z, out / "probe.pt")
    w = model.quantize.embedding.weight
    print(f"mechanism: {K - torch.unique(w, dim=0).shape[0]} of {K} codes are exact copies of another code "
          f"after {SCENARIO['steps']} steps (the init drew {torch.unique(z0, dim=0).shape[0]} distinct vectors); "
          f"code norm median {w.norm(dim=1).median().item():.3g} vs |z| median {z.norm(dim=1).median().item():.3g}")


if __name__ == "__main__":
    main()
