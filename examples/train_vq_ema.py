"""Train a tiny VQ-EMA classifier on synthetic data, and save a checkpoint and a probe.

A plain script to copy from (it needs only torch): the same model as `vqdoctor demo`.

    python examples/train_vq_ema.py --bug --out runs/bug      # collapses
    python examples/train_vq_ema.py --out runs/fixed          # the fix
    vqdoctor inspect runs/bug/checkpoint.pt --probe runs/bug/probe.pt

Model: 32-d Gaussian-mixture inputs (10 classes) -> MLP encoder ending in LayerNorm -> VQ-EMA
(512 codes of dim 128, decay 0.99, eps 1e-5, codebook initialised from encoder outputs,
commitment 0.01) -> MLP head. Adam, lr 1e-3, gradient clipping 1.0, batch 512.

`--bug` starts the EMA counts (`cluster_size`) at zero without debiasing, as many VQ-VAE ports
do. The first EMA update then divides the codes' sums by almost nothing: codes the first batch
missed grow ~decay/eps = 1e5 times, the others ~99/count times; the least inflated code takes
every input from then on (perplexity 1-2), the rest are never chosen again, accuracy stays at
chance. Without `--bug` the counts start at ones, and codes whose count falls below half the
expected count n/K are re-seeded from the current batch with their statistics reset
(`--no-replace` turns that off, leaving the dead codes a classifier's moving encoder strands).

Files written to `--out`: `checkpoint.pt` (the model's state dict; the quantizer's buffers are
`quantizer.embed` [K, D], `quantizer.cluster_size` [K], `quantizer.embed_avg` [K, D],
`quantizer.initted`), `probe.pt` (encoder outputs on held-out data, [N, D]) and, with
`--every N`, `step{N}.pt` snapshots (pass several to `vqdoctor inspect` for drift).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class EMAQuantizer(nn.Module):
    """Euclidean VQ whose codebook is the EMA of the encoder outputs assigned to each code."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, eps: float = 1e-5,
                 zero_init_counts: bool = False, replace_below: float | None = 0.5) -> None:
        super().__init__()
        self.codebook_size, self.decay, self.eps = codebook_size, decay, eps
        self.zero_init_counts, self.replace_below = zero_init_counts, replace_below
        self.register_buffer("embed", torch.zeros(codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim))
        self.register_buffer("initted", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, z: torch.Tensor) -> None:
        """Data-dependent init: K random encoder outputs."""
        rows = z[torch.randperm(z.shape[0])[: self.codebook_size]]
        self.embed.copy_(rows)
        self.embed_avg.copy_(rows)
        # THE BUG (--bug): zero counts make the first update divide by ~eps. Ones keep
        # embed == embed_avg / cluster_size from the start.
        self.cluster_size.fill_(0.0 if self.zero_init_counts else 1.0)
        self.initted.fill_(True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through output, commitment MSE, code indices)."""
        zd = z.detach()
        dist = zd.pow(2).sum(1, keepdim=True) - 2 * zd @ self.embed.t() + self.embed.pow(2).sum(1)
        idx = dist.argmin(1)
        q = self.embed[idx]
        if self.training:
            self.ema_update(zd, idx)
        return z + (q - z).detach(), F.mse_loss(z, q), idx

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """One EMA step with Laplace smoothing, then optional dead-code re-seeding."""
        onehot = F.one_hot(idx, self.codebook_size).to(z.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        if self.replace_below is not None:
            expected = z.shape[0] / self.codebook_size
            dead = self.cluster_size < self.replace_below * expected
            if dead.any():
                pick = z[torch.randint(0, z.shape[0], (int(dead.sum()),))]
                # Reset the statistics too, or the next EMA step undoes the re-seed.
                self.embed[dead] = pick
                self.cluster_size[dead] = expected
                self.embed_avg[dead] = pick * expected


class Model(nn.Module):
    """encoder -> quantizer -> head."""

    def __init__(self, input_dim: int, hidden: int, dim: int, codebook_size: int, classes: int,
                 zero_init_counts: bool, replace_below: float | None) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim), nn.LayerNorm(dim))
        self.quantizer = EMAQuantizer(codebook_size, dim, zero_init_counts=zero_init_counts,
                                      replace_below=replace_below)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, commit, idx = self.quantizer(self.encoder(x))
        return self.head(q), commit, idx


def make_data(n: int, input_dim: int = 32, classes: int = 10, modes: int = 3
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian mixture: `modes` unit-variance modes per class."""
    means = torch.randn(classes, modes, input_dim)
    y = torch.randint(0, classes, (n,))
    x = means[y, torch.randint(0, modes, (n,))] + torch.randn(n, input_dim)
    return x, y


def perplexity(idx: torch.Tensor, k: int) -> float:
    p = torch.bincount(idx, minlength=k).double()
    p = p[p > 0] / p.sum()
    return math.exp(float(-(p * p.log()).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bug", action="store_true", help="zero-initialised EMA counts, no re-seeding")
    ap.add_argument("--no-replace", action="store_true", help="no dead-code re-seeding")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=0, help="also save a snapshot every N steps")
    ap.add_argument("--out", type=Path, default=Path("runs/vq-ema"))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    K, D, batch, commitment = 512, 128, 512, 0.01
    x, y = make_data(10_000 + 4096)
    x_tr, y_tr, x_te, y_te = x[:10_000], y[:10_000], x[10_000:], y[10_000:]
    model = Model(32, 128, D, K, 10, zero_init_counts=args.bug,
                  replace_below=None if args.bug or args.no_replace else 0.5)
    with torch.no_grad():
        model.quantizer.init_from(model.encoder(x_tr[: 8 * K]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    args.out.mkdir(parents=True, exist_ok=True)

    model.train()
    for step in range(1, args.steps + 1):
        i = torch.randint(0, len(x_tr), (batch,))
        logits, commit, idx = model(x_tr[i])
        loss = F.cross_entropy(logits, y_tr[i]) + commitment * commit
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step <= 2 or step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4g}  perplexity {perplexity(idx, K):.1f}")
        if args.every and step % args.every == 0:
            torch.save(model.state_dict(), args.out / f"step{step}.pt")

    model.eval()  # evaluation must not update the EMA statistics
    with torch.no_grad():
        z = model.encoder(x_te)
        logits, _, idx = model(x_te)
    acc = (logits.argmax(1) == y_te).double().mean().item()
    print(f"test accuracy {acc:.3f}, codes used {idx.unique().numel()}/{K}")
    torch.save(model.state_dict(), args.out / "checkpoint.pt")
    torch.save(z, args.out / "probe.pt")
    print(f"vqdoctor inspect {args.out / 'checkpoint.pt'} --probe {args.out / 'probe.pt'}")


if __name__ == "__main__":
    main()
