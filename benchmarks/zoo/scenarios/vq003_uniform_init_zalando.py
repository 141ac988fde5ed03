"""VQ003 scale-mismatch: zalando `VectorQuantizer` uniform(+-1/K) codebook against 256-d unit-scale features.

The zalando-research VQ-VAE notebook's gradient-trained `VectorQuantizer` (copied inline: a
standalone script cannot import it) initialises its codebook uniform(-1/K, 1/K): with K = 64 and
D = 256 every code has norm ~0.14, while the encoder's 256-d outputs on standardised features have
norms ~4 at init, ~25x larger. All codes sit in a tiny ball near the origin, so the decoder sees
almost nothing of the input; its straight-through gradient pushes the encoder outwards faster than
the codebook loss (Adam ~1e-3 per step per coordinate) can drag the codes along: measured, |z|
4 -> 59 while |e| crawls 0.15 -> 2.8, and the loss climbs from 1.3 to ~18 (the latent terms).
With only 64 codes usage is not the symptom here (~52 codes chosen). Commitment 0.25, Adam 1e-3.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCENARIO = {
    "expect": "scale-mismatch",
    "onset": 0,
    "library": "zalando-style",
    "family": "vq",
    "K": 64, "D": 256, "tokens_per_step": 1024, "steps": 200,
    "launch": "python",
    "fault": "uniform(+-1/K) init (|e| ~ 0.15) against 256-d encoder outputs (|z| ~ 4 at init, 50 later)",
}
K, D, IN, BATCH, STEPS = 64, 256, 256, 1024, 200


class VectorQuantizer(nn.Module):
    """zalando `VectorQuantizer` (gradient-trained, uniform(+-1/K) init); input [B, C, H, W]."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost):
        super().__init__()
        self._embedding_dim, self._num_embeddings = embedding_dim, num_embeddings
        self._embedding = nn.Embedding(self._num_embeddings, self._embedding_dim)
        self._embedding.weight.data.uniform_(-1 / self._num_embeddings, 1 / self._num_embeddings)
        self._commitment_cost = commitment_cost

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
        e_latent_loss = F.mse_loss(quantized.detach(), inputs)
        q_latent_loss = F.mse_loss(quantized, inputs.detach())
        loss = q_latent_loss + self._commitment_cost * e_latent_loss
        quantized = inputs + (quantized - inputs).detach()
        avg_probs = torch.mean(encodings, dim=0)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        return loss, quantized.permute(0, 3, 1, 2).contiguous(), perplexity, encodings


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 256), nn.ReLU(), nn.Linear(256, D))
        self._vq_vae = VectorQuantizer(K, D, 0.25)
        self.decoder = nn.Sequential(nn.Linear(D, 256), nn.ReLU(), nn.Linear(256, IN))

    def forward(self, x):
        z = self.encoder(x)[:, :, None, None]  # tokens as 1x1 maps
        loss, q, ppl, enc = self._vq_vae(z)
        return self.decoder(q.flatten(1)), loss, ppl, enc.argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(14000 + args.seed)
    centres = torch.randn(128, IN, generator=g)

    def batch(n):  # standardised 256-d features from a 128-component mixture
        return centres[torch.randint(0, 128, (n,), generator=g)] + 0.5 * torch.randn(n, IN, generator=g)

    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(STEPS):
        x = batch(BATCH)
        recon, vq_loss, ppl, idx = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == STEPS - 1:
            zn = model.encoder(x).norm(dim=1).median()
            en = model._vq_vae._embedding.weight.norm(dim=1).median()
            print(f"step {step:4d} loss {loss.item():.4f} |z| median {zn:.3g} |e| median {en:.3g} perplexity "
                  f"{ppl.item():5.1f} used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(16 * K))
        _, _, ppl, enc = model._vq_vae(z[:, :, None, None])
    print(f"held-out: perplexity {ppl.item():.1f} used {enc.argmax(1).unique().numel()}/{K}; "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
