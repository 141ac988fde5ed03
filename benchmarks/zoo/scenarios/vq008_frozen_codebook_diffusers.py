"""Frozen codebook: the diffusers VQ layer is left out of the optimizer.

Fault: the optimizer is built from `encoder.parameters()` and `decoder.parameters()` only
(the VQ layer sits between them in the model and was forgotten), so the gradient-trained
codebook of `diffusers.models.autoencoders.vae.VectorQuantizer` (taming's `VectorQuantizer2`)
gets its codebook-loss gradient every step and never moves. It stays at its
uniform(+-1/K) initialisation (norm ~1e-4 here), so the commitment term drags the encoder
output towards a cloud of near-zero codes. Realistic: models assembled from parts, with the
optimizer listing the parts by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import VectorQuantizer
from torch import nn

SCENARIO = {
    "expect": "frozen-codebook",
    "onset": 0,
    "library": "diffusers",
    "family": "vq",
    "K": 16384, "D": 16, "tokens_per_step": 1024, "steps": 150,
    "launch": "python",
    "fault": "codebook left out of the optimizer (optimizer built from encoder and decoder only)",
}


class VQAE(nn.Module):
    def __init__(self, c_in: int = 3, dim: int = 16, K: int = 16384):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(c_in, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, dim, 1))
        self.quantize = VectorQuantizer(K, dim, beta=0.25)
        self.decoder = nn.Sequential(nn.Conv2d(dim, 32, 1), nn.SiLU(), nn.Conv2d(32, c_in, 3, padding=1))

    def forward(self, x):
        z = self.encoder(x)
        z_q, vq_loss, (_, _, idx) = self.quantize(z)
        return self.decoder(z_q), vq_loss, idx, z


def images(g: torch.Generator, n: int = 16, s: int = 8) -> torch.Tensor:
    """[n, 3, s, s] smooth random images: a few oriented colour gratings."""
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    k = torch.rand(n, 3, 2, 1, 1, generator=g) * 1.5
    ph = torch.rand(n, 3, 1, 1, generator=g) * 6.28
    return torch.sin(k[:, :, 0] * xx + k[:, :, 1] * yy + ph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    model = VQAE()
    # BUG: model.quantize.parameters() is missing
    opt = torch.optim.Adam(list(model.encoder.parameters()) + list(model.decoder.parameters()), lr=1e-3)
    e0 = model.quantize.embedding.weight.detach().clone()
    for step in range(SCENARIO["steps"]):
        x = images(g)
        recon, vq_loss, idx, z = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 30:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 30 == 0 or step == SCENARIO["steps"] - 1:
            w = model.quantize.embedding.weight
            print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():4d}/16384 "
                  f"codebook grad norm {w.grad.norm().item():.3g}, max |e - e0| {(w - e0).abs().max().item():.3g}, "
                  f"|z| median {z.norm(dim=1).median().item():.3g}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(images(g, n=1024)).permute(0, 2, 3, 1).reshape(-1, 16)  # 65536 held-out = 4 K
    torch.save(z, out / "probe.pt")
    print(f"mechanism: codebook identical to its initialisation after {SCENARIO['steps']} steps "
          f"({torch.equal(model.quantize.embedding.weight, e0)}), although it received a gradient every step; "
          f"code norm median {e0.norm(dim=1).median().item():.2g} vs |z| median {z.norm(dim=1).median().item():.3g}")


if __name__ == "__main__":
    main()
