"""No encoder gradient: the encoder output is detached before the quantizer.

Fault: `self.vq(z.detach())`, left over from a setup that trained the tokenizer on frozen
pretrained features (or added "to save memory"). vector-quantize-pytorch's straight-through
output is `z_detached + (q - z_detached).detach()`: the decoder's gradient arrives at the
quantizer input and stops there, and the commitment loss has no path to the encoder either.
The encoder stays at its random initialisation; the EMA codebook and the decoder train, so the
loss falls a little and usage looks fine while the model learns nothing upstream of the VQ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "no-encoder-gradient",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 1024, "D": 128, "tokens_per_step": 2048, "steps": 200,
    "launch": "python",
    "fault": "encoder output detached before the quantizer: the encoder never receives a gradient",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 40, dim: int = 128, K: int = 1024):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 128), nn.GELU(), nn.Linear(128, dim))
        self.vq = VectorQuantize(dim=dim, codebook_size=K, decay=0.9, kmeans_init=True, kmeans_iters=5,
                                 commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, idx, commit = self.vq(z.detach())  # BUG: should be self.vq(z)
        return self.decoder(q), commit, idx


def batch(centers: torch.Tensor, g: torch.Generator, n: int = 16, t: int = 128) -> torch.Tensor:
    c = torch.randint(len(centers), (n, t), generator=g)
    return centers[c] + 0.5 * torch.randn(n, t, centers.shape[1], generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=77)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    centers = 2 * torch.randn(512, 40, generator=g)
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w0 = model.encoder[0].weight.detach().clone()
    for step in range(SCENARIO["steps"]):
        x = batch(centers, g)
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon, x) + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 50:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 50 == 0 or step == SCENARIO["steps"] - 1:
            grads = [p.grad for p in model.encoder.parameters()]
            dec = torch.stack([p.grad.norm() for p in model.decoder.parameters()]).norm().item()
            print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():4d}/1024 "
                  f"encoder grads: {'None' if grads[0] is None else 'present'}, decoder grad norm {dec:.3g}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        z = model.encoder(batch(centers, g, n=64)).reshape(-1, 128)  # 8192 held-out vectors = 8 K
    torch.save(z, out / "probe.pt")
    print(f"mechanism: encoder weights changed by {(model.encoder[0].weight - w0).abs().max().item():.3g} "
          f"in {SCENARIO['steps']} Adam steps (never received a gradient)")


if __name__ == "__main__":
    main()
