"""Hand-written quantizers in the styles people copy into their repositories.

Written for this zoo (no third-party code): the layouts and update rules follow the public
designs they are named after, so a checkpoint looks like theirs.

- `TamingQuantizer`: taming-transformers `VectorQuantizer2` style: gradient-trained
  `embedding` (`nn.Embedding`), input `[B, C, H, W]`, uniform(+-1/K) default init, `legacy`
  switches which term beta weights.
- `ZalandoEMA`: zalando-research `VectorQuantizerEMA` style: `_embedding`, `_ema_w`,
  `_ema_cluster_size`, Laplace-smoothed counts, input `[B, C, H, W]`.
- `RosinalityQuantize`: rosinality VQ-VAE-2 `Quantize` style: `embed` stored `[dim, n_embed]`,
  `cluster_size`, `embed_avg`, channels-last input.
- `Lookup` / `LookupEMA`: plain custom modules whose names say nothing about quantization
  (`table`, `counts`, `sums`), channels-last input.

Fault switches (used only by the generated faults): `straight_through=False` returns the
looked-up codes instead of `z + (q - z).detach()`; `counts_init` = 0 starts the EMA counts at
zero (no debiasing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _nearest(flat: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ table.t() + table.pow(2).sum(1)
    return d.argmin(1)


class TamingQuantizer(nn.Module):
    """Gradient-trained VQ in the taming `VectorQuantizer2` layout."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, legacy: bool = True,
                 straight_through: bool = True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.straight_through = straight_through
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        idx = _nearest(flat, self.embedding.weight)
        z_q = self.embedding(idx).view(z.shape)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        if self.straight_through:
            z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q, loss, (None, None, idx)


class ZalandoEMA(nn.Module):
    """EMA VQ in the zalando `VectorQuantizerEMA` layout (smoothed counts stored)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float, decay: float,
                 epsilon: float = 1e-5, counts_init: float = 0.0, straight_through: bool = True):
        super().__init__()
        self._embedding_dim, self._num_embeddings = embedding_dim, num_embeddings
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.normal_()
        self._commitment_cost = commitment_cost
        self.register_buffer("_ema_cluster_size", torch.full((num_embeddings,), float(counts_init)))
        self._ema_w = nn.Parameter(torch.Tensor(num_embeddings, embedding_dim))
        self._ema_w.data.normal_()
        self._decay, self._epsilon = decay, epsilon
        self.straight_through = straight_through

    def forward(self, inputs: torch.Tensor):
        inputs = inputs.permute(0, 2, 3, 1).contiguous()
        shape = inputs.shape
        flat = inputs.view(-1, self._embedding_dim)
        idx = _nearest(flat, self._embedding.weight)
        enc = F.one_hot(idx, self._num_embeddings).type(flat.dtype)
        quantized = (enc @ self._embedding.weight).view(shape)
        if self.training:
            with torch.no_grad():
                cs = self._ema_cluster_size * self._decay + (1 - self._decay) * enc.sum(0)
                n = cs.sum()
                cs = (cs + self._epsilon) / (n + self._num_embeddings * self._epsilon) * n
                self._ema_cluster_size.copy_(cs)
                self._ema_w.data.mul_(self._decay).add_(enc.t() @ flat, alpha=1 - self._decay)
                self._embedding.weight.data.copy_(self._ema_w / cs.unsqueeze(1))
        loss = self._commitment_cost * F.mse_loss(quantized.detach(), inputs)
        if self.straight_through:
            quantized = inputs + (quantized - inputs).detach()
        avg = enc.mean(0)
        perplexity = torch.exp(-torch.sum(avg * torch.log(avg + 1e-10)))
        return loss, quantized.permute(0, 3, 1, 2).contiguous(), perplexity, idx


class RosinalityQuantize(nn.Module):
    """EMA VQ in the rosinality VQ-VAE-2 `Quantize` layout (`embed` is `[dim, n_embed]`)."""

    def __init__(self, dim: int, n_embed: int, decay: float = 0.99, eps: float = 1e-5,
                 counts_init: float = 0.0, straight_through: bool = True):
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
        self.straight_through = straight_through
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.full((n_embed,), float(counts_init)))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, input: torch.Tensor):
        flatten = input.reshape(-1, self.dim)
        dist = flatten.pow(2).sum(1, keepdim=True) - 2 * flatten @ self.embed + self.embed.pow(2).sum(0, keepdim=True)
        embed_ind = dist.argmin(1)
        onehot = F.one_hot(embed_ind, self.n_embed).type(flatten.dtype)
        embed_ind = embed_ind.view(*input.shape[:-1])
        quantize = F.embedding(embed_ind, self.embed.transpose(0, 1))
        if self.training:
            with torch.no_grad():
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(flatten.t() @ onehot, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                cs = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
                self.embed.copy_(self.embed_avg / cs.unsqueeze(0))
        diff = (quantize.detach() - input).pow(2).mean()
        if self.straight_through:
            quantize = input + (quantize - input).detach()
        return quantize, diff, embed_ind


class Lookup(nn.Module):
    """A custom gradient-trained VQ with neutral names: returns (out, codes, extra_loss)."""

    def __init__(self, n: int, width: int, beta: float = 0.25, straight_through: bool = True):
        super().__init__()
        self.n, self.width, self.beta = n, width, beta
        self.straight_through = straight_through
        self.table = nn.Embedding(n, width)
        nn.init.uniform_(self.table.weight, -1.0 / n, 1.0 / n)

    def forward(self, h: torch.Tensor):
        flat = h.reshape(-1, self.width)
        codes = _nearest(flat, self.table.weight)
        picked = self.table(codes).view(h.shape)
        extra = F.mse_loss(picked, h.detach()) + self.beta * F.mse_loss(h, picked.detach())
        out = h + (picked - h).detach() if self.straight_through else picked
        return out, codes.view(h.shape[:-1]), extra


class LookupEMA(nn.Module):
    """A custom EMA VQ with neutral names (`table`, `counts`, `sums`): returns (out, codes, extra)."""

    def __init__(self, n: int, width: int, rate: float = 0.99, beta: float = 0.25, counts_init: float = 1.0,
                 straight_through: bool = True):
        super().__init__()
        self.n, self.width, self.rate, self.beta = n, width, rate, beta
        self.straight_through = straight_through
        table = torch.randn(n, width)
        self.register_buffer("table", table)
        self.register_buffer("counts", torch.full((n,), float(counts_init)))
        self.register_buffer("sums", table.clone())

    def forward(self, h: torch.Tensor):
        flat = h.reshape(-1, self.width)
        codes = _nearest(flat, self.table)
        picked = F.embedding(codes, self.table).view(h.shape)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(codes, self.n).type(flat.dtype)
                self.counts.mul_(self.rate).add_(onehot.sum(0), alpha=1 - self.rate)
                self.sums.mul_(self.rate).add_(onehot.t() @ flat, alpha=1 - self.rate)
                total = self.counts.sum()
                smooth = (self.counts + 1e-5) / (total + self.n * 1e-5) * total
                self.table.copy_(self.sums / smooth.unsqueeze(1))
        extra = self.beta * F.mse_loss(h, picked.detach())
        out = h + (picked - h).detach() if self.straight_through else picked
        return out, codes.view(h.shape[:-1]), extra
