"""No encoder gradient: a hand-written VQ layer that forgot the straight-through line.

Fault: a taming/zalando-style gradient-trained quantizer written in the training script
returns the looked-up code vectors `q` to the decoder instead of `z + (q - z).detach()`.
argmin has no gradient, so the reconstruction gradient stops at the codebook rows that were
selected; the encoder only receives the commitment term `beta * d|z - sg(q)|^2/dz`, which
pulls it onto the codes it already hits and carries no information about the task.
The codebook itself trains (it gets the decoder's gradient through `q`), so losses fall and
nothing looks broken. One of the most common bugs in hand-written VQ-VAEs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCENARIO = {
    "expect": "no-encoder-gradient",
    "onset": 0,
    "library": "inline (taming-style)",
    "family": "vq",
    "K": 128, "D": 4, "tokens_per_step": 4096, "steps": 300,
    "launch": "python",
    "fault": "quantizer returns the codes q instead of z + (q - z).detach(): no straight-through gradient",
}


class VectorQuantizer(nn.Module):
    """Gradient-trained VQ (taming `VectorQuantizer2` loss, legacy=False), channels-last input."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)  # default N(0, 1) init, the scale of z

    def forward(self, z: torch.Tensor):
        z_flat = z.reshape(-1, self.e_dim)
        d = (z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ self.embedding.weight.t()
             + self.embedding.weight.pow(2).sum(1))
        idx = d.argmin(1)
        z_q = self.embedding(idx).view(z.shape)
        loss = self.beta * F.mse_loss(z_q.detach(), z) + F.mse_loss(z_q, z.detach())
        # BUG: the straight-through line is missing:  z_q = z + (z_q - z).detach()
        return z_q, loss, idx


class AE(nn.Module):
    def __init__(self, d_in: int = 16, dim: int = 4, K: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, dim))
        self.quantize = VectorQuantizer(K, dim)
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, vq_loss, idx = self.quantize(z)
        z.retain_grad()  # only for printing the gradients at the quantizer below
        q.retain_grad()
        return self.decoder(q), vq_loss, idx, z, q


def batch(centers: torch.Tensor, g: torch.Generator, n: int = 4096) -> torch.Tensor:
    """A mixture of 64 Gaussian clusters in 16-d."""
    c = torch.randint(len(centers), (n,), generator=g)
    return centers[c] + 0.3 * torch.randn(n, centers.shape[1], generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(64, 16, generator=g)
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    enc_params = list(model.encoder.parameters())
    for step in range(SCENARIO["steps"]):
        x = batch(centers, g)
        recon, vq_loss, idx, z, q = model(x)
        recon_loss = F.mse_loss(recon, x)
        loss = recon_loss + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 50:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 50 == 0 or step == SCENARIO["steps"] - 1:
            cos = F.cosine_similarity(z.grad.flatten(), q.grad.flatten(), dim=0).item()
            enc_gn = torch.stack([p.grad.norm() for p in enc_params]).norm().item()
            print(f"step {step:4d} recon {recon_loss.item():.4f} codes used {idx.unique().numel():3d}/128 "
                  f"|dL/dz| / |dL/dq| = {z.grad.norm().item() / q.grad.norm().item():.3g}, cos {cos:+.3f}, "
                  f"encoder grad norm {enc_gn:.3g}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(batch(centers, g, n=2048))  # 2048 = 16 K held-out vectors
    torch.save(z, out / "probe.pt")
    print("mechanism: dL/dz is the commitment term only (the ratio and cosine above compare it with the "
          "decoder's gradient at q, which ends in the selected codebook rows)")


if __name__ == "__main__":
    main()
