"""Index collapse: un-logged power spectra saturate a tanh encoder; every frame encodes to one point.

Fault: the features are power spectrogram frames (values up to ~1e4) that were meant to be
log-compressed; the `log1p` was forgotten. The encoder ends in a tanh (bounded latents). Its
pre-activations are in the hundreds and share one sign pattern (the spectra are all positive,
dominated by the same 1/f envelope), so every frame lands on the same corner of the hypercube,
and the saturated tanh passes no gradient: the encoder never recovers. The quantizer
(transformers' DAC `DacVectorQuantize`, gradient-trained cosine codebook, healthy settings)
assigns that single point to a single code. The collapse of the encoder output is the root
cause; codebook, losses and straight-through path are fine.
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
    "expect": "index-collapse",
    "onset": 0,
    "library": "transformers",
    "family": "vq",
    "K": 512, "D": 8, "tokens_per_step": 512, "steps": 200,
    "launch": "python",
    "fault": "power spectra without log compression saturate the tanh encoder head: outputs collapse to a point",
}


class AE(nn.Module):
    def __init__(self, bins: int = 40, hidden: int = 64, K: int = 512, dim: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(bins, 96, 1), nn.GELU(), nn.Conv1d(96, hidden, 1), nn.Tanh())
        self.quantizer = DacVectorQuantize(DacConfig(hidden_size=hidden, codebook_size=K, codebook_dim=dim))
        self.decoder = nn.Sequential(nn.Conv1d(hidden, 96, 1), nn.GELU(), nn.Conv1d(96, bins, 1))

    def forward(self, x):
        h = self.encoder(x)
        q, commit, codebook, codes, _ = self.quantizer(h)
        return self.decoder(q), 0.25 * commit + codebook, codes, h


def spectra(g: torch.Generator, n: int = 8, t: int = 64, bins: int = 40) -> torch.Tensor:
    """[n, bins, t] power spectra: a 1/f envelope at a random loudness, with 3 random partials."""
    f = torch.arange(1, bins + 1).float()
    loud = torch.rand(n, t, 1, generator=g) * 180 + 20
    f0 = torch.rand(n, t, 3, 1, generator=g) * 8 + 2
    partials = (torch.rand(n, t, 3, 1, generator=g) * torch.exp(-((f % f0) ** 2))).sum(2)
    mag = loud * (1 + partials) / f.sqrt()
    return (mag ** 2).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=606)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    model = AE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(SCENARIO["steps"]):
        x = spectra(g)
        recon, vq_loss, codes, h = model(x)  # BUG: should be model(torch.log1p(x))
        loss = F.mse_loss(recon, torch.log1p(x)) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 50:
            torch.save(model.state_dict(), out / "early.pt")
        if step % 50 == 0 or step == SCENARIO["steps"] - 1:
            print(f"step {step:4d} loss {loss.item():.4f} codes used {codes.unique().numel():3d}/512 "
                  f"tanh saturated (|h| > 0.999): {(h.abs() > 0.999).float().mean().item():.1%}")
    torch.save(model.state_dict(), out / "final.pt")
    with torch.no_grad():
        h = model.encoder(spectra(g, n=64))  # 4096 held-out vectors = 8 K
    z = h.transpose(1, 2).reshape(-1, h.shape[1])
    torch.save(z, out / "probe.pt")
    spread = (z - z.mean(0)).norm(dim=-1).median() / z.norm(dim=-1).median()
    print(f"mechanism: median |z - mean z| / median |z| = {spread.item():.2e}; "
          f"distinct sign patterns among 4096 held-out z: {torch.unique(z.sign(), dim=0).shape[0]}; "
          f"tanh'(pre) median {(1 - z.pow(2)).median().item():.2e}")


if __name__ == "__main__":
    main()
