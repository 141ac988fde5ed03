"""Tiny real trainings for the integration tests: a vector-quantize-pytorch autoencoder trained
by a real `lightning.Trainer`, a real `transformers.Trainer`, and a plain loop under
`vqdoctor.watch` (the reference the callbacks must match record for record).

Nothing in training draws from the global RNG (no k-means init, no dead-code replacement, no
dropout, no shuffling), so the same seed gives bitwise the same training whichever loop runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "watch"))
from watch_models import QuantAE, diffusers_vq, lucid_vq, make_data, unpack_diffusers  # noqa: E402

STEPS = 120
BATCH = 8
LR = 3e-3


def autoencoder(collapse: bool, seed: int = 0) -> nn.Module:
    """encoder -> quantizer -> decoder, as a module returning {"loss", "recon"}.

    collapse=True: diffusers' `VectorQuantizer` (uniform(+-1/K) codebook) against encoder outputs
    x100: nearest-code assignment degenerates (scale-mismatch at the root, index collapse under
    it); nothing in it draws random numbers. collapse=False: vector-quantize-pytorch
    `VectorQuantize` with k-means init and dead-code replacement, 16 expected hits per code.
    """
    torch.manual_seed(seed)
    if collapse:
        return Net(QuantAE(diffusers_vq(), layout="bdhw", unpack=unpack_diffusers, z_scale=100.0))
    return Net(QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8)))


class Net(nn.Module):
    """x [B, N, 8] -> {"loss", "recon"}: MSE reconstruction plus the quantizer's auxiliary loss
    (the dict output a Hugging Face `Trainer` reads its loss from)."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor, labels: Any = None) -> dict[str, torch.Tensor]:
        recon, aux = self.ae(x)
        return {"loss": F.mse_loss(recon, x) + aux, "recon": recon}


def data(steps: int = STEPS) -> torch.Tensor:
    """steps x BATCH samples [64, 8] as one tensor (a DataLoader of BATCH without shuffling
    yields exactly `make_data`'s batches)."""
    return torch.cat(make_data(steps, batch=BATCH))


def plain_loop(model: nn.Module, x: torch.Tensor, doctor: Any, *, lr: float = LR) -> None:
    """The reference: Adam, zero_grad / forward / backward / step per batch, the loss recorded
    after the step (where the callbacks see it)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(0, len(x), BATCH):
        out = model(x[i:i + BATCH])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        doctor.record_loss(out["loss"])


def comparable(streams: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records that must agree between two loops: per-step, run-wide, usage histograms."""
    return [r for recs in streams.values() for r in recs if r.get("t") in ("step", "run", "hist")]
