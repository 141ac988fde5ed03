"""Dead codes: transformers' DAC quantizer, N(0,1) 32-d codebook, data with 3 degrees of freedom.

Fault: `DacVectorQuantize` keeps `nn.Embedding`'s default N(0, 1) init (the model's
`_init_weights` is not run when the quantizer is used on its own) and has no k-means init and
no dead-code replacement. Its lookup is cosine (l2-normalised factorized codes), so the
encoder outputs, which have 3 degrees of freedom, cover a thin curved sheet of the 32-d
sphere; only codes whose random direction lies near that sheet are ever nearest. The codebook
is gradient-trained: only selected codes get a codebook-loss gradient, the rest never move.
Realistic: reusing a codec quantizer for a tokenizer of low-dimensional features without the
k-means init or random restarts that codec trainers rely on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DacConfig
from transformers.models.dac.modeling_dac import DacVectorQuantize

SCENARIO = {
    "expect": "dead-codes",
    "onset": 0,
    "library": "transformers",
    "family": "vq",
    "K": 4096, "D": 32, "tokens_per_step": 1024, "steps": 300,
    "launch": "python",
    "fault": "N(0,1) 32-d cosine codebook, no k-means/restarts, inputs with 3 degrees of freedom",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 24, hidden: int = 64, K: int = 4096, dim: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(d_in, 96, 1), nn.GELU(), nn.Conv1d(96, hidden, 1))
        cfg = DacConfig(hidden_size=hidden, codebook_size=K, codebook_dim=dim)
        self.quantizer = DacVectorQuantize(cfg)
        self.decoder = nn.Sequential(nn.Conv1d(hidden, 96, 1), nn.GELU(), nn.Conv1d(96, d_in, 1))

    def forward(self, x):
        h = self.encoder(x)
        q, commit, codebook, codes, _ = self.quantizer(h)
        return self.decoder(q), 0.25 * commit + codebook, codes, h


def batch(mix: torch.Tensor, g: torch.Generator, n: int = 8, t: int = 128) -> torch.Tensor:
    """[n, 24, t] observations x = sin(s A) of a 3-d latent s."""
    s = torch.randn(n, t, mix.shape[0], generator=g)
    return torch.sin(s @ mix).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=55)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    mix = torch.randn(3, 24, generator=g) * 0.7
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    K = SCENARIO["K"]
    hits = torch.zeros(K)
    for step in range(SCENARIO["steps"]):
        x = batch(mix, g)
        recon, vq_loss, codes, _ = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits += torch.bincount(codes.flatten(), minlength=K)
        if step == 50:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 50 == 0 or step == SCENARIO["steps"] - 1:
            print(f"step {step:4d} loss {loss.item():.4f} codes used in batch {codes.unique().numel():4d}/{K} "
                  f"codes ever selected {(hits > 0).sum().item():4d}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        h = model.encoder(batch(mix, g, n=160))  # 20480 held-out vectors = 5 K
        probe = h.transpose(1, 2).reshape(-1, h.shape[1])
        lat = F.normalize(model.quantizer.in_proj(h).transpose(1, 2).reshape(-1, 32), dim=-1)
    torch.save(probe, out / "probe.pt")
    sv = torch.linalg.svdvals(lat - lat.mean(0))
    print(f"mechanism: normalised factorized latents hold {(sv[:3].pow(2).sum() / sv.pow(2).sum()).item():.1%} "
          f"of their variance in 3 of 32 directions; {(hits == 0).sum().item()} of {K} codes never selected in "
          f"{SCENARIO['steps']} steps; codebook row norm median {model.quantizer.codebook.weight.norm(dim=1).median():.3g} "
          f"(N(0,1) init: {32 ** 0.5:.3g})")


if __name__ == "__main__":
    main()
