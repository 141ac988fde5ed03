"""rosinality/vq-vae-2-pytorch at ef5f67c: `Quantize` starts `cluster_size` at zeros (PR #72).

Follows `vqvae.py` and `train_vqvae.py` of https://github.com/rosinality/vq-vae-2-pytorch at
commit ef5f67c46f93624163776caec9e0d95063910eca, rewritten here and scaled down (channel 32,
one residual block, embed_dim 16, n_embed 128, 32x32 synthetic images): the two-level VQ-VAE-2
(bottom encoder stride 4, top encoder stride 2, `quantize_conv_t` / `quantize_t`, `dec_t`,
`quantize_conv_b` / `quantize_b`, `upsample_t`, decoder), the Sonnet-style EMA `Quantize` with
`embed` stored `[dim, n_embed]`, and the loop: Adam, MSE + 0.25 x latent loss,
`model.zero_grad()`, a sample forward under `model.eval()` / `no_grad` every 100 iterations,
`torch.save(model.state_dict(), ...)` per epoch.

The reported bug (pull request #72, "correctly initialize the moving counter of codebook entry
utilization ... initializing this to 0 leads to divides by ~0 and numerically unstable
embeddings at the beginning of training"): `cluster_size` is registered as zeros while
`embed_avg` is a clone of the random `embed`, so after the first EMA update every code the
batch missed is divided by a Laplace-smoothed count of ~eps. `--fixed` applies the pull
request: `torch.ones(n_embed)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, write_reference  # noqa: E402

CASE = {
    "repo": "rosinality/vq-vae-2-pytorch",
    "commit": "ef5f67c46f93624163776caec9e0d95063910eca",
    "issue": "pull request #72",
    "expect": "ema-divergence",
    "mechanism": "zero-counts",
    "learn": "ema",
    "K": 128, "stages": 2,  # top and bottom quantizers, 128 codes each
    "fault": "cluster_size registered as zeros; embed_avg = randn embed: unhit codes divided by ~eps",
}


class Quantize(nn.Module):
    def __init__(self, dim, n_embed, decay=0.99, eps=1e-5, fixed=False):
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(n_embed) if fixed else torch.zeros(n_embed))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, input):
        flatten = input.reshape(-1, self.dim)
        dist = flatten.pow(2).sum(1, keepdim=True) - 2 * flatten @ self.embed + self.embed.pow(2).sum(0, keepdim=True)
        _, embed_ind = (-dist).max(1)
        embed_onehot = F.one_hot(embed_ind, self.n_embed).type(flatten.dtype)
        embed_ind = embed_ind.view(*input.shape[:-1])
        quantize = F.embedding(embed_ind, self.embed.transpose(0, 1))
        if self.training:
            onehot_sum = embed_onehot.sum(0)
            embed_sum = flatten.transpose(0, 1) @ embed_onehot
            self.cluster_size.data.mul_(self.decay).add_(onehot_sum, alpha=1 - self.decay)
            self.embed_avg.data.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            cluster_size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
            self.embed.data.copy_(self.embed_avg / cluster_size.unsqueeze(0))
        diff = (quantize.detach() - input).pow(2).mean()
        quantize = input + (quantize - input).detach()
        return quantize, diff, embed_ind


class ResBlock(nn.Module):
    def __init__(self, in_channel, channel):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(in_channel, channel, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channel, in_channel, 1))

    def forward(self, input):
        return input + self.conv(input)


class Encoder(nn.Module):
    def __init__(self, in_channel, channel, n_res_block, n_res_channel, stride):
        super().__init__()
        if stride == 4:
            blocks = [nn.Conv2d(in_channel, channel // 2, 4, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(channel // 2, channel, 4, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(channel, channel, 3, padding=1)]
        else:
            blocks = [nn.Conv2d(in_channel, channel // 2, 4, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(channel // 2, channel, 3, padding=1)]
        blocks += [ResBlock(channel, n_res_channel) for _ in range(n_res_block)] + [nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, input):
        return self.blocks(input)


class Decoder(nn.Module):
    def __init__(self, in_channel, out_channel, channel, n_res_block, n_res_channel, stride):
        super().__init__()
        blocks = [nn.Conv2d(in_channel, channel, 3, padding=1)]
        blocks += [ResBlock(channel, n_res_channel) for _ in range(n_res_block)] + [nn.ReLU()]
        if stride == 4:
            blocks += [nn.ConvTranspose2d(channel, channel // 2, 4, stride=2, padding=1), nn.ReLU(),
                       nn.ConvTranspose2d(channel // 2, out_channel, 4, stride=2, padding=1)]
        else:
            blocks.append(nn.ConvTranspose2d(channel, out_channel, 4, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, input):
        return self.blocks(input)


class VQVAE(nn.Module):
    def __init__(self, in_channel=3, channel=32, n_res_block=1, n_res_channel=16, embed_dim=16, n_embed=128,
                 decay=0.99, fixed=False):
        super().__init__()
        self.enc_b = Encoder(in_channel, channel, n_res_block, n_res_channel, stride=4)
        self.enc_t = Encoder(channel, channel, n_res_block, n_res_channel, stride=2)
        self.quantize_conv_t = nn.Conv2d(channel, embed_dim, 1)
        self.quantize_t = Quantize(embed_dim, n_embed, decay, fixed=fixed)
        self.dec_t = Decoder(embed_dim, embed_dim, channel, n_res_block, n_res_channel, stride=2)
        self.quantize_conv_b = nn.Conv2d(embed_dim + channel, embed_dim, 1)
        self.quantize_b = Quantize(embed_dim, n_embed, decay, fixed=fixed)
        self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1)
        self.dec = Decoder(embed_dim + embed_dim, in_channel, channel, n_res_block, n_res_channel, stride=4)

    def forward(self, input):
        quant_t, quant_b, diff, id_t, id_b, z_b = self.encode(input)
        return self.decode(quant_t, quant_b), diff, id_t, id_b, z_b

    def encode(self, input):
        enc_b = self.enc_b(input)
        enc_t = self.enc_t(enc_b)
        quant_t = self.quantize_conv_t(enc_t).permute(0, 2, 3, 1)
        quant_t, diff_t, id_t = self.quantize_t(quant_t)
        quant_t = quant_t.permute(0, 3, 1, 2)
        dec_t = self.dec_t(quant_t)
        enc_b = torch.cat([dec_t, enc_b], 1)
        z_b = self.quantize_conv_b(enc_b).permute(0, 2, 3, 1)
        quant_b, diff_b, id_b = self.quantize_b(z_b)
        quant_b = quant_b.permute(0, 3, 1, 2)
        return quant_t, quant_b, (diff_t + diff_b).unsqueeze(0), id_t, id_b, z_b

    def decode(self, quant_t, quant_b):
        return self.dec(torch.cat([self.upsample_t(quant_t), quant_b], 1))


def images(g: torch.Generator, n: int) -> torch.Tensor:
    """Smooth random 32x32 RGB images in [-1, 1] (what Normalize(0.5, 0.5) gives)."""
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * fine) * 2 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixed", action="store_true", help="apply pull request #72 (cluster_size = ones)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    model = VQVAE(fixed=args.fixed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    criterion = nn.MSELoss()
    latent_loss_weight, epochs, iters = 0.25, 3, 50
    rec = Recorder(128, 1, epochs * iters)  # the bottom quantizer (8x8 per image) is the one measured
    rec.initial(model.quantize_b.embed.t())
    files = {}
    step = 0
    for epoch in range(epochs):
        for i in range(iters):
            model.zero_grad()
            img = images(g, 16)
            out_img, latent_loss, _, id_b, z_b = model(img)
            recon_loss = criterion(out_img, img)
            loss = recon_loss + latent_loss_weight * latent_loss.mean()
            if step % 10 == 0:
                rec.task_grad(step, torch.autograd.grad(recon_loss, z_b, retain_graph=True, allow_unused=True)[0])
            loss.backward()
            optimizer.step()
            rec.codes(step, id_b.reshape(-1, 1))
            rec.end_step(step, float(loss.detach()), float(recon_loss.detach()), z_b.detach().reshape(-1, 16),
                         model.quantize_b.embed.t())
            if i % 100 == 0:  # the sample written every 100 iterations, in eval mode
                model.eval()
                with torch.no_grad():
                    model(img[:8])
                model.train()
            step += 1
        name = "early.pt" if epoch == 0 else "final.pt"
        torch.save(model.state_dict(), out / name)  # the repository saves one file per epoch
        files["early" if epoch == 0 else "final"] = name
    model.eval()
    with torch.no_grad():
        z = model.encode(images(g, 128))[5].reshape(-1, 16)  # 8192 bottom-level encoder outputs
    torch.save({"quantize_b": z}, out / "probe.pt")
    files["probe"] = "probe.pt"
    write_reference(out, rec, model.quantize_b.embed.t(), files, {"fixed": args.fixed})


if __name__ == "__main__":
    main()
