"""Healthy two-level VQ-VAE-2 (rosinality vq-vae-2-pytorch layout), top and bottom EMA codebooks.

rosinality's `Quantize` is copied inline (a standalone script cannot import the test fixtures):
`embed` is stored [dim, n_embed], Laplace smoothing eps 1e-5, channels-last input. Three fixes
that forks apply make it healthy: the EMA counts start at one instead of zero (rosinality PR #72),
each codebook is seeded from encoder outputs of the first batch (`embed_avg = embed * count`, so
`embed == embed_avg / count` holds from the start), and codes whose EMA count falls below 0.1x
the expected count n/K are restarted from a random current input with their statistics reset
(Jukebox-style random restarts). EMA decay 0.95. The model is a miniature of rosinality's `VQVAE`
(same module names) on 3x16x16 images with structure at two scales: top latents 4x4 (512 tokens
per step), bottom latents 8x8 (2048). Latent loss weight 0.25. Nothing is wrong.

(Without the restarts the untrained encoder's outputs, seeded into the codebooks, span a tiny
region, the encoder then moves and grows 5x, and the top level ends with ~20-70 of 512 codes.)
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
    "library": "rosinality-style",
    "family": "vqvae2",
    "K": 512, "D": 32, "tokens_per_step": 2048, "steps": 250,
    "launch": "python",
    "fault": "none: counts start at one, codebooks seeded from data, restarts below 0.1 n/K (top: 512 tokens/step)",
}
K, D, CH, BATCH, STEPS = 512, 32, 64, 32, 250


class Quantize(nn.Module):
    """rosinality `Quantize`, with counts starting at ones and random restarts of dead codes."""

    def __init__(self, dim, n_embed, decay=0.95, eps=1e-5, restart=0.1):
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps, self.restart = dim, n_embed, decay, eps, restart
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(n_embed))  # upstream: torch.zeros
        self.register_buffer("embed_avg", embed.clone())
        self.restarts = 0

    def forward(self, input):
        flatten = input.reshape(-1, self.dim)
        dist = (flatten.pow(2).sum(1, keepdim=True) - 2 * flatten @ self.embed
                + self.embed.pow(2).sum(0, keepdim=True))
        _, embed_ind = (-dist).max(1)
        embed_onehot = F.one_hot(embed_ind, self.n_embed).type(flatten.dtype)
        embed_ind = embed_ind.view(*input.shape[:-1])
        quantize = self.embed_code(embed_ind)
        if self.training:
            embed_onehot_sum = embed_onehot.sum(0)
            embed_sum = flatten.transpose(0, 1) @ embed_onehot
            self.cluster_size.data.mul_(self.decay).add_(embed_onehot_sum, alpha=1 - self.decay)
            self.embed_avg.data.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            cluster_size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
            embed_normalized = self.embed_avg / cluster_size.unsqueeze(0)
            self.embed.data.copy_(embed_normalized)
            self.restart_dead(flatten.detach())
        diff = (quantize.detach() - input).pow(2).mean()
        quantize = input + (quantize - input).detach()
        return quantize, diff, embed_ind

    def embed_code(self, embed_id):
        return F.embedding(embed_id, self.embed.transpose(0, 1))

    @torch.no_grad()
    def restart_dead(self, flatten):  # Jukebox-style: below 0.1 n/K, restart from a current input
        threshold = self.restart * flatten.shape[0] / self.n_embed
        dead = self.cluster_size < threshold
        if dead.any():
            rows = flatten[torch.randint(0, flatten.shape[0], (int(dead.sum()),))].t()
            self.embed[:, dead] = rows
            self.embed_avg[:, dead] = rows * threshold
            self.cluster_size[dead] = threshold
            self.restarts += int(dead.sum())

    @torch.no_grad()
    def seed(self, z):  # the data-dependent init: K distinct encoder outputs of the first batch
        flat = z.reshape(-1, self.dim)
        rows = flat[torch.randperm(flat.shape[0])[: self.n_embed]].t()
        self.embed.copy_(rows)
        self.embed_avg.copy_(rows * self.cluster_size)


class VQVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc_b = nn.Sequential(nn.Conv2d(3, CH, 4, 2, 1), nn.ReLU(), nn.Conv2d(CH, CH, 3, 1, 1))
        self.enc_t = nn.Sequential(nn.Conv2d(CH, CH, 4, 2, 1), nn.ReLU(), nn.Conv2d(CH, CH, 3, 1, 1))
        self.quantize_conv_t = nn.Conv2d(CH, D, 1)
        self.quantize_t = Quantize(D, K)
        self.dec_t = nn.Sequential(nn.Conv2d(D, CH, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(CH, D, 4, 2, 1))
        self.quantize_conv_b = nn.Conv2d(D + CH, D, 1)
        self.quantize_b = Quantize(D, K)
        self.upsample_t = nn.ConvTranspose2d(D, D, 4, 2, 1)
        self.dec = nn.Sequential(nn.Conv2d(2 * D, CH, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(CH, 3, 4, 2, 1))

    def encode_t(self, input):
        enc_b = self.enc_b(input)
        return enc_b, self.quantize_conv_t(self.enc_t(enc_b)).permute(0, 2, 3, 1)

    def forward(self, input):
        enc_b, quant_t = self.encode_t(input)
        quant_t, diff_t, id_t = self.quantize_t(quant_t)
        quant_t = quant_t.permute(0, 3, 1, 2)
        dec_t = self.dec_t(quant_t)
        quant_b = self.quantize_conv_b(torch.cat([dec_t, enc_b], 1)).permute(0, 2, 3, 1)
        quant_b, diff_b, id_b = self.quantize_b(quant_b)
        quant_b = quant_b.permute(0, 3, 1, 2)
        dec = self.dec(torch.cat([self.upsample_t(quant_t), quant_b], 1))
        return dec, diff_t + diff_b, id_t, id_b


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
    g = torch.Generator().manual_seed(6000 + args.seed)

    def batch(n):  # structure at two scales: 4x4 and 8x8 noise, upsampled to 16x16
        coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear")
        fine = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=16, mode="bilinear")
        return coarse + 0.5 * fine

    model = VQVAE()
    with torch.no_grad():  # seed both codebooks from the first batch
        x = batch(BATCH)
        enc_b, zt = model.encode_t(x)
        model.quantize_t.seed(zt)
        qt = model.quantize_t.embed_code(torch.cdist(zt.reshape(-1, D), model.quantize_t.embed.t()).argmin(1))
        dec_t = model.dec_t(qt.view_as(zt).permute(0, 3, 1, 2))
        model.quantize_b.seed(model.quantize_conv_b(torch.cat([dec_t, enc_b], 1)).permute(0, 2, 3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, latent_loss, id_t, id_b = model(x)
        loss = F.mse_loss(recon, x) + 0.25 * latent_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d} loss {loss.item():.4f} perplexity top {perplexity(id_t, K):6.1f} "
                  f"bottom {perplexity(id_b, K):6.1f} restarts so far {model.quantize_t.restarts} / "
                  f"{model.quantize_b.restarts}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():  # probe: the inputs of both quantizers on 128 held-out images
        x = batch(128)
        enc_b, zt = model.encode_t(x)
        qt, _, id_t = model.quantize_t(zt)
        zb = model.quantize_conv_b(torch.cat([model.dec_t(qt.permute(0, 3, 1, 2)), enc_b], 1)).permute(0, 2, 3, 1)
        id_b = model.quantize_b(zb)[2]
    print(f"held-out: perplexity top {perplexity(id_t, K):.1f} ({id_t.unique().numel()} used of {id_t.numel()} "
          f"tokens) bottom {perplexity(id_b, K):.1f} ({id_b.unique().numel()} used of {id_b.numel()}) "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save({"quantize_t": zt.reshape(-1, D), "quantize_b": zb.reshape(-1, D)}, out / "probe.pt")


if __name__ == "__main__":
    main()
