"""Draft: the SPEC user story's classifier (exploration version)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BUGS = ("none", "zero-counts", "no-smoothing", "fp16-ema", "eval-shift", "kmeans-scale")


class VQEMA(nn.Module):
    def __init__(self, k, dim, decay=0.99, eps=1e-5, bugs=()):
        super().__init__()
        self.k, self.decay, self.eps, self.bugs = k, decay, eps, set(bugs)
        dt = torch.float16 if "fp16-ema" in self.bugs else torch.float32
        self.register_buffer("embed", torch.zeros(k, dim))
        self.register_buffer("cluster_size", torch.zeros(k, dtype=dt))
        self.register_buffer("embed_avg", torch.zeros(k, dim, dtype=dt))
        self.register_buffer("initted", torch.tensor(False))

    @torch.no_grad()
    def kmeans_init(self, z, iters=10, gen=None):
        k = self.k
        n = z.shape[0]
        first = torch.randint(0, n, (1,), generator=gen)
        centers = [z[first]]
        d2 = (z - centers[0]).pow(2).sum(1)
        for _ in range(1, k):
            i = torch.multinomial(d2 / d2.sum(), 1, generator=gen)
            centers.append(z[i])
            d2 = torch.minimum(d2, (z - z[i]).pow(2).sum(1))
        c = torch.cat(centers)
        for _ in range(iters):
            idx = torch.cdist(z, c).argmin(1)
            bins = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(c).index_add_(0, idx, z)
            c = torch.where(bins[:, None] > 0, sums / bins.clamp(min=1)[:, None], c)
        self.embed.copy_(c)
        if "zero-counts" in self.bugs:
            self.cluster_size.zero_()
            self.embed_avg.copy_(c)
        else:
            self.cluster_size.copy_(bins)
            self.embed_avg.copy_(c * bins[:, None])
        self.initted.fill_(True)
        return bins

    def forward(self, z):
        zd = z.detach()
        dist = zd.pow(2).sum(1, keepdim=True) - 2 * zd @ self.embed.t() + self.embed.pow(2).sum(1)
        idx = dist.argmin(1)
        q = self.embed[idx]
        if self.training:
            self.ema_update(zd, idx)
        return z + (q - z).detach(), F.mse_loss(z, q), idx

    @torch.no_grad()
    def ema_update(self, z, idx):
        dt = self.cluster_size.dtype
        onehot = F.one_hot(idx, self.k).to(dt)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ z.to(dt), alpha=1 - self.decay)
        n = self.cluster_size.sum()
        if "no-smoothing" in self.bugs:
            smoothed = self.cluster_size + self.eps
        else:
            smoothed = (self.cluster_size + self.eps) / (n + self.k * self.eps) * n
        self.embed.copy_((self.embed_avg / smoothed.unsqueeze(1)).float())


class Classifier(nn.Module):
    def __init__(self, in_dim, hidden, dim, k, classes, bugs, layernorm=False):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                  nn.Linear(hidden, dim)]
        if layernorm:
            layers.append(nn.LayerNorm(dim))
        self.encoder = nn.Sequential(*layers)
        self.vq = VQEMA(k, dim, bugs=bugs)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        q, commit, idx = self.vq(self.encoder(x))
        return self.head(q), commit, idx


def make_data(seed, in_dim=32, classes=10, modes=3, n_train=10000, n_test=2048, shift=False):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, modes, in_dim, generator=g) * 2
    n = n_train + n_test
    y = torch.randint(0, classes, (n,), generator=g)
    m = torch.randint(0, modes, (n,), generator=g)
    x = means[y, m] + torch.randn(n, in_dim, generator=g)
    # raw "sensor" units
    scale = torch.rand(in_dim, generator=g) * 50 + 10
    offset = torch.randn(in_dim, generator=g) * 100
    x = x * scale + offset
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    mu, sd = xtr.mean(0), xtr.std(0)
    xtr = (xtr - mu) / sd
    if not shift:
        xte = (xte - mu) / sd
    return xtr, ytr, xte, yte


def perplexity(idx, k):
    p = torch.bincount(idx, minlength=k).double()
    p = p[p > 0] / p.sum()
    return math.exp(float(-(p * p.log()).sum()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--opt", default="adam")
    ap.add_argument("--commit", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layernorm", action="store_true")
    ap.add_argument("--eval-train-mode", type=int, default=1)
    ap.add_argument("--eval-first", type=int, default=1)
    ap.add_argument("--kmeans-batch", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kscale", type=float, default=100.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = make_data(a.seed, shift="eval-shift" in a.bug)
    model = Classifier(xtr.shape[1], 128, 128, a.k, 10, a.bug, a.layernorm)
    gen = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        xi = xtr[: a.kmeans_batch]
        if "kmeans-scale" in a.bug:
            xi = xi * a.kscale
        bins = model.vq.kmeans_init(model.encoder(xi), gen=gen)
    print(f"kmeans: empty {(bins == 0).sum().item()}, z-norm {model.encoder(xtr[:512]).norm(dim=1).median():.3g} "
          f"code-norm {model.vq.embed.norm(dim=1).median():.3g}")
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=a.lr) if a.opt == "adam" else torch.optim.SGD(params, lr=a.lr, momentum=0.9)
    steps_per_epoch = xtr.shape[0] // a.batch

    def evaluate():
        model.eval()
        if a.eval_train_mode:
            model.vq.train()
        correct, loss_sum, idxs = 0, 0.0, []
        with torch.no_grad():
            for i in range(0, xte.shape[0], a.batch):
                lo, commit, idx = model(xte[i:i + a.batch])
                loss_sum += float(F.cross_entropy(lo, yte[i:i + a.batch], reduction="sum"))
                correct += int((lo.argmax(1) == yte[i:i + a.batch]).sum())
                idxs.append(idx)
        model.train()
        idx = torch.cat(idxs)
        return correct / xte.shape[0], loss_sum / xte.shape[0], perplexity(idx, a.k)

    if a.eval_first:
        acc, vl, vp = evaluate()
        print(f"epoch 0 eval acc {acc:.3f} loss {vl:.3g} ppl {vp:.1f}")
    step = 0
    t0 = time.time()
    for ep in range(1, a.epochs + 1):
        perm = torch.randperm(xtr.shape[0], generator=gen)
        losses, ppls, commits = [], [], []
        for b in range(steps_per_epoch):
            i = perm[b * a.batch:(b + 1) * a.batch]
            w = a.commit * min(1.0, (step + 1) / (a.warmup * steps_per_epoch)) if a.warmup else a.commit
            lo, commit, idx = model(xtr[i])
            loss = F.cross_entropy(lo, ytr[i]) + w * commit
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            commits.append(commit.item())
            ppls.append(perplexity(idx, a.k))
            if step <= 3:
                print(f"  step {step} ppl {ppls[-1]:.1f} loss {losses[-1]:.3g}")
        acc, vl, vp = evaluate()
        cs = model.vq.cluster_size.float()
        if ep % 5 == 0 or ep <= 2 or ep == a.epochs:
            zn = model.encoder(xtr[:512]).norm(dim=1).median().item()
            print(f"epoch {ep} loss {sum(losses)/len(losses):.3g} max {max(losses):.3g} commit {commits[-1]:.3g} "
                  f"ppl {ppls[-1]:.1f} acc {acc:.3f} vloss {vl:.3g} vppl {vp:.1f} |z| {zn:.3g} "
                  f"|e|max {model.vq.embed.norm(dim=1).max().item():.3g} "
                  f"cs0 {(cs == 0).sum().item()} cs_tiny {((cs > 0) & (cs < 0.01 * cs.sum() / a.k)).sum().item()}")
    print(f"time {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
