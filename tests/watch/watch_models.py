"""Tiny real trainings for the watch tests: autoencoders around real VQ libraries' quantizers.

Every model maps x [B, N, 8] -> (reconstruction, auxiliary quantizer loss). Data come from a
private generator (a mixture of Gaussian clusters), so data never consume the global RNG and
two runs with the same seed see the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IN_DIM = 8


def lucid_vq(dim: int = 16, codebook_size: int = 32, **kw: Any) -> nn.Module:
    """vector-quantize-pytorch `VectorQuantize` (EMA)."""
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(dim=dim, codebook_size=codebook_size, **kw)


class QuantAE(nn.Module):
    """encoder -> quantizer -> decoder, with the quantizer's input layout chosen per library.

    Args:
        quantizer: the quantizer module (attribute name `quantizer` unless `name` says otherwise).
        code_dim: channels entering the quantizer.
        layout: "bnd" ([B, N, D], lucidrains), "bdn" ([B, D, N], encodec), "bdhw" ([B, D, N, 1], diffusers).
        unpack: quantizer output -> (quantized, aux loss).
        hidden: MLP width.
        dropout: dropout after the first encoder layer (consumes RNG in training).
        inplace: use ReLU(inplace=True).
        z_scale: multiply encoder outputs by this.
        straight_through: False to feed the decoder q without the z + (q - z).detach() trick
            (only meaningful for quantizers that return raw codes).
        name: attribute name of the quantizer.
    """

    def __init__(self, quantizer: nn.Module, code_dim: int = 16, layout: str = "bnd",
                 unpack: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 hidden: int = 32, dropout: float = 0.0, inplace: bool = False, z_scale: float = 1.0,
                 name: str = "quantizer"):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, hidden), nn.ReLU(inplace=inplace), nn.Dropout(dropout),
                                     nn.Linear(hidden, code_dim))
        self.qname = name
        self.add_module(name, quantizer)
        self.decoder = nn.Sequential(nn.Linear(code_dim, hidden), nn.ReLU(inplace=inplace), nn.Linear(hidden, IN_DIM))
        self.layout = layout
        self.unpack = unpack or (lambda out: (out[0], out[2].sum()))
        self.z_scale = z_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x) * self.z_scale  # [B, N, D]
        if self.layout == "bdn":
            z = z.transpose(1, 2)
        elif self.layout == "bdhw":
            z = z.transpose(1, 2).unsqueeze(-1)
        q, aux = self.unpack(getattr(self, self.qname)(z))
        if self.layout == "bdn":
            q = q.transpose(1, 2)
        elif self.layout == "bdhw":
            q = q.squeeze(-1).transpose(1, 2)
        return self.decoder(q), aux


class BrokenSTQuantizer(nn.Module):
    """A hand-written VQ that forgets the straight-through trick: the decoder gets the raw codes.

    The codebook learns from the codebook loss; the encoder gets only the commitment gradient
    (none when `beta` is 0).
    """

    def __init__(self, codebook_size: int = 32, dim: int = 16, beta: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.beta = beta

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = z.reshape(-1, z.shape[-1])
        idx = torch.cdist(flat, self.embedding.weight).argmin(-1)
        q = self.embedding(idx).view_as(z)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        return q, loss, idx.view(z.shape[:-1])


def make_data(steps: int, batch: int = 8, tokens: int = 64, clusters: int = 32, seed: int = 1,
              scale: float = 1.0) -> list[torch.Tensor]:
    """`steps` batches [batch, tokens, 8] from a fixed mixture of Gaussian clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, IN_DIM, generator=g) * 2.0
    out = []
    for _ in range(steps):
        k = torch.randint(0, clusters, (batch, tokens), generator=g)
        out.append((centres[k] + 0.1 * torch.randn(batch, tokens, IN_DIM, generator=g)) * scale)
    return out


def train(model: nn.Module, data: list[torch.Tensor], *, lr: float = 3e-3, doctor: Any = None,
          opt: torch.optim.Optimizer | None = None, call_step: bool = True,
          hook: Callable[[int], None] | None = None, sgd: bool = False) -> list[float]:
    """A plain training loop; returns the losses (read after the run, never inside it)."""
    if opt is None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr) if sgd else torch.optim.Adam(params, lr=lr)
    losses = []
    for i, x in enumerate(data):
        if hook is not None:
            hook(i)
        y, aux = model(x)
        loss = F.mse_loss(y, x) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        if doctor is not None and call_step:
            doctor.step(loss=loss)
        losses.append(loss.detach())
    return [float(v) for v in losses]


def encodec_rvq(num_quantizers: int = 2, dim: int = 16, codebook_size: int = 32, **kw: Any) -> nn.Module:
    """encodec `core_vq.ResidualVectorQuantization` (EMA, k-means init, dead-code replacement)."""
    from tests.libs import encodec_core_vq

    return encodec_core_vq().ResidualVectorQuantization(num_quantizers=num_quantizers, dim=dim,
                                                        codebook_size=codebook_size, **kw)


def diffusers_vq(codebook_size: int = 32, dim: int = 16, beta: float = 0.25) -> nn.Module:
    """diffusers `VectorQuantizer` (gradient-trained codebook, uniform(+-1/K) init)."""
    from diffusers.models.autoencoders.vae import VectorQuantizer

    return VectorQuantizer(codebook_size, dim, beta=beta, legacy=False)


def unpack_diffusers(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_q, loss) of diffusers' (z_q, loss, (perplexity, encodings, indices))."""
    return out[0], out[1]


class SyncFreeEMAQuantizer(nn.Module):
    """Sonnet-style EMA VQ with no host reads and no data-dependent shapes (CUDA-sync-free):
    argmin, scatter one-hot, EMA with Laplace smoothing, straight-through. Input [..., D]."""

    def __init__(self, dim: int = 16, codebook_size: int = 64, decay: float = 0.99, eps: float = 1e-5,
                 beta: float = 0.25):
        super().__init__()
        self.decay, self.eps, self.beta, self.K = decay, eps, beta, codebook_size
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = z.reshape(-1, z.shape[-1])
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)
        idx = dist.argmin(1)
        q = self.embed.index_select(0, idx).view_as(z)
        if self.training:
            with torch.no_grad():
                onehot = torch.zeros(flat.shape[0], self.K, device=z.device, dtype=flat.dtype)
                onehot.scatter_(1, idx[:, None], 1.0)
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(onehot.t() @ flat.detach(), alpha=1 - self.decay)
                n = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
                self.embed.copy_(self.embed_avg / smoothed[:, None])
        return z + (q - z).detach(), self.beta * F.mse_loss(z, q.detach()), idx.view(z.shape[:-1])
