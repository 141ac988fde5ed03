"""VQ004 ema-divergence: zero-initialised EMA counts without debiasing (zalando `VectorQuantizerEMA`).

The zalando-research VQ-VAE notebook's EMA quantizer, copied inline (a standalone script cannot
import it): `_ema_cluster_size` starts at zeros, decay 0.99, epsilon 1e-5, and the stored counts are
the Laplace-smoothed ones. As the user of the story did (docs/contract.md#the-user-story: k-means++
init), the codebook and `_ema_w` are seeded with encoder outputs of the first batch; the counts stay
zero. After the first update a code the batch missed gets `0.99 * w0 / ~1e-5`, ~10^5 times its init;
a code hit c times gets ~`0.99 * w0 / (0.01 c)`, inflated ~99/c times. The most-hit codes are
inflated least and take every input from then on; the rest are never chosen again. (The notebook
also re-creates its Parameters every step, so the optimizer holds stale copies: harmless here,
nothing trains them.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCENARIO = {
    "expect": "ema-divergence",
    "onset": 0,
    "library": "zalando-style",
    "family": "vq-ema",
    "K": 4096, "D": 8, "tokens_per_step": 1024, "steps": 150,
    "launch": "python",
    "fault": "zalando VectorQuantizerEMA (data-seeded): zero-initialised counts, no debiasing: codes inflate 99/c to 1e5x at step 1",
}
K, D, BATCH, STEPS = 4096, 8, 16, 150


class VectorQuantizerEMA(nn.Module):
    """zalando `VectorQuantizerEMA`; input [B, C, H, W]; returns (loss, quantized, perplexity, encodings)."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, decay, epsilon=1e-5):
        super().__init__()
        self._embedding_dim, self._num_embeddings = embedding_dim, num_embeddings
        self._embedding = nn.Embedding(self._num_embeddings, self._embedding_dim)
        self._embedding.weight.data.normal_()
        self._commitment_cost = commitment_cost
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self._ema_w = nn.Parameter(torch.Tensor(num_embeddings, self._embedding_dim))
        self._ema_w.data.normal_()
        self._decay, self._epsilon = decay, epsilon

    def forward(self, inputs):
        inputs = inputs.permute(0, 2, 3, 1).contiguous()
        input_shape = inputs.shape
        flat_input = inputs.view(-1, self._embedding_dim)
        distances = (torch.sum(flat_input ** 2, dim=1, keepdim=True) + torch.sum(self._embedding.weight ** 2, dim=1)
                     - 2 * torch.matmul(flat_input, self._embedding.weight.t()))
        encoding_indices = torch.argmin(distances, dim=1).unsqueeze(1)
        encodings = torch.zeros(encoding_indices.shape[0], self._num_embeddings, device=inputs.device)
        encodings.scatter_(1, encoding_indices, 1)
        quantized = torch.matmul(encodings, self._embedding.weight).view(input_shape)
        if self.training:
            self._ema_cluster_size = self._ema_cluster_size * self._decay + (1 - self._decay) * torch.sum(encodings, 0)
            n = torch.sum(self._ema_cluster_size.data)
            self._ema_cluster_size = ((self._ema_cluster_size + self._epsilon)
                                      / (n + self._num_embeddings * self._epsilon) * n)
            dw = torch.matmul(encodings.t(), flat_input)
            self._ema_w = nn.Parameter(self._ema_w * self._decay + (1 - self._decay) * dw)
            self._embedding.weight = nn.Parameter(self._ema_w / self._ema_cluster_size.unsqueeze(1))
        e_latent_loss = F.mse_loss(quantized.detach(), inputs)
        loss = self._commitment_cost * e_latent_loss
        quantized = inputs + (quantized - inputs).detach()
        avg_probs = torch.mean(encodings, dim=0)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        return loss, quantized.permute(0, 3, 1, 2).contiguous(), perplexity, encodings


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self._encoder = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, D, 3, 1, 1))
        self._vq_vae = VectorQuantizerEMA(K, D, 0.25, 0.99)
        self._decoder = nn.Sequential(nn.Conv2d(D, 32, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(32, 3, 4, 2, 1))

    def forward(self, x):
        loss, q, ppl, _ = self._vq_vae(self._encoder(x))
        return self._decoder(q), loss, ppl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(16000 + args.seed)

    def batch(n):  # smooth random images, roughly unit scale
        return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear", align_corners=False)

    model = AE()
    with torch.no_grad():  # data-dependent init of the codebook and the EMA sums (counts stay 0)
        z = torch.cat([model._encoder(batch(BATCH)) for _ in range(4)]).permute(0, 2, 3, 1).reshape(-1, D)
        rows = z[torch.randperm(z.shape[0])[:K]]
        model._vq_vae._embedding.weight.copy_(rows)
        model._vq_vae._ema_w.copy_(rows)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    init_norm = model._vq_vae._embedding.weight.norm(dim=1).median().item()
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, vq_loss, ppl = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, 1, 2, 5) or step % 25 == 0 or step == STEPS - 1:
            norms = model._vq_vae._embedding.weight.norm(dim=1)
            print(f"step {step:4d} loss {loss.item():.4f} perplexity {ppl.item():7.1f} codes > 90x their init "
                  f"norm {int((norms > 90 * init_norm).sum())}/{K} (max {norms.max() / init_norm:.2g}x)", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model._encoder(batch(256))  # [256, D, 8, 8]: 16384 vectors = 4 K
        _, _, ppl, enc = model._vq_vae(z)
    print(f"held-out: perplexity {ppl.item():.2f} used {enc.argmax(1).unique().numel()}/{K}; "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z.permute(0, 2, 3, 1).reshape(-1, D), out / "probe.pt")


if __name__ == "__main__":
    main()
