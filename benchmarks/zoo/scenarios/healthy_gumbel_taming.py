"""Healthy Gumbel-softmax quantizer: taming-transformers `GumbelQuantize`, copied inline.

taming's module (a standalone script cannot import it): a 1x1 conv turns the encoder's hidden
map into logits over K codes, a hard Gumbel-softmax sample (straight-through) picks one, and the
code vectors live in `embed` ([K, D], trained by gradient). Its KL-to-uniform term keeps the
code distribution spread; weight 0.03 here (with taming's 5e-4 this small model ends with 39 of 64
codes chosen by the logits' argmax on held-out data, with 0.03 all 64). A conv autoencoder on
3x16x16 smooth random images (8x8 latents); hidden width = code dim = 64 as in taming's Gumbel
VQGAN configs; temperature annealed from 1.0 to 0.5. Nothing is wrong.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCENARIO = {
    "expect": "healthy",
    "onset": 0,
    "library": "taming-style",
    "family": "gumbel",
    "K": 64, "D": 64, "tokens_per_step": 2048, "steps": 250,
    "launch": "python",
    "fault": "none: hard Gumbel-softmax, KL-to-uniform 0.03, temperature 1.0 -> 0.5",
}
K, D, HID, BATCH, STEPS = 64, 64, 64, 32, 250


class GumbelQuantize(nn.Module):
    """taming.modules.vqvae.quantize.GumbelQuantize (no remap)."""

    def __init__(self, num_hiddens, embedding_dim, n_embed, straight_through=True, kl_weight=5e-4, temp_init=1.0):
        super().__init__()
        self.embedding_dim, self.n_embed = embedding_dim, n_embed
        self.straight_through, self.temperature, self.kl_weight = straight_through, temp_init, kl_weight
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def forward(self, z, temp=None):
        hard = self.straight_through if self.training else True
        temp = self.temperature if temp is None else temp
        logits = self.proj(z)
        soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=hard)
        z_q = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, self.embed.weight)
        qy = F.softmax(logits, dim=1)  # + kl divergence to the prior loss
        diff = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()
        ind = soft_one_hot.argmax(dim=1)
        return z_q, diff, (None, None, ind)


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, HID, 4, 2, 1), nn.ReLU(), nn.Conv2d(HID, HID, 3, 1, 1))
        self.quantize = GumbelQuantize(HID, D, K, kl_weight=0.03)
        self.decoder = nn.Sequential(nn.Conv2d(D, HID, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(HID, 3, 4, 2, 1))

    def forward(self, x):
        z_q, kl, (_, _, idx) = self.quantize(self.encoder(x))
        return self.decoder(z_q), kl, idx.flatten()


def perplexity(idx: torch.Tensor, k: int) -> float:
    p = torch.bincount(idx, minlength=k).float() / idx.numel()
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
    g = torch.Generator().manual_seed(7000 + args.seed)

    def batch(n):  # smooth random images: 4x4 noise upsampled to 16x16
        return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear", align_corners=False)

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        model.quantize.temperature = 1.0 - 0.5 * step / STEPS
        x = batch(BATCH)
        recon, kl, idx = model(x)
        loss = F.mse_loss(recon, x) + kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d} loss {loss.item():.4f} perplexity {perplexity(idx, K):6.1f} "
                  f"used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        h = model.encoder(batch(32))  # 2048 hidden vectors = 32 K
        idx = model.quantize.proj(h).argmax(1).flatten()  # the deterministic choice
    print(f"held-out: perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K} time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(h.permute(0, 2, 3, 1).reshape(-1, HID), out / "probe.pt")


if __name__ == "__main__":
    main()
