"""The classifier from vqdoctor's user story, on synthetic data (plain PyTorch, no vqdoctor).

The story (docs/contract.md#the-user-story): a classifier with a 128-d encoder feeding a 128-d
VQ-EMA layer; commitment 0.01, EMA decay 0.99, k-means++ init, gradient clipping 1.0, a 5-epoch loss
warm-up, the VQ kept in training mode during evaluation. The person saw perplexity 1-2 in the first
batch, the loss climbing to 1e13, accuracy at chance and ~280-300 codes with tiny non-zero counts.

    python examples/seed_report/train.py --out runs/exact               # the story's settings, correct VQ-EMA
    python examples/seed_report/train.py --bug zero-counts --layernorm --out runs/story   # the story
    vqdoctor watch -- python examples/seed_report/train.py --bug zero-counts --layernorm --out runs/story
    vqdoctor inspect runs/story/early.pt runs/story/final.pt --probe runs/story/probe.pt
    python examples/seed_report/train.py --bug zero-counts --layernorm --fixed --out runs/fixed

What reproduces and what does not, with numbers across seeds: README.md next to this file.

Model: 32-d inputs (10 classes, 3 Gaussian modes each, standardised with the training set's
statistics) -> MLP encoder to 128-d (optionally ending in a LayerNorm) -> VQ-EMA (K = 512 codes of
dimension 128, decay 0.99, Laplace smoothing eps 1e-5, k-means++ init on the encoder outputs of
four training batches) -> MLP head -> 10 logits. Loss: cross-entropy + commitment weight * MSE(z,
sg(q)), the weight ramped linearly from 0 to 0.01 over the first 5 epochs (the "loss warm-up").
Adam (lr 1e-3), gradient-norm clipping 1.0, batch 512 (one code per example), 30 epochs of 20
steps. Before training (the chance baseline) and after every epoch the held-out set is evaluated
under `torch.no_grad()` with `model.eval()`, then the VQ is put back into training mode, as in the
story: so evaluation batches also update the EMA statistics.

Bugs (`--bug NAME`, repeatable; each is one or two lines in the code, marked BUG):
  zero-counts    the k-means++ init writes the codebook (`embed`, `embed_avg`) but leaves the EMA
                 counts `cluster_size` at zero, with no debiasing (rosinality / zalando / taming
                 EMA quantizers start there; the k-means init was bolted on)
  no-smoothing   `embed = embed_avg / cluster_size`, no Laplace smoothing
  fp16-ema       EMA statistics kept in float16 (e.g. after `model.half()` of the quantizer)
  eval-shift     the held-out set is not standardised (the transform was forgotten), and its
                 batches flow into the EMA through the train-mode VQ
  kmeans-scale   the k-means++ init runs on encoder outputs of un-standardised inputs (the raw
                 dataset), a different scale from every later encoder output
`--fixed` applies vqdoctor's fixes: counts initialised from the k-means cluster sizes (consistent
with `embed_avg`), the VQ left in eval mode during evaluation, and codes whose count falls below
half the expected count n/K re-seeded from the current batch, statistics reset with them
(`--no-replace` leaves the re-seeding out). With `--bug` it removes the quantizer bugs
(zero-counts, no-smoothing, fp16-ema) and keeps the data bugs (eval-shift, kmeans-scale).

Files written to `--out`: `early.pt` (after epoch 1) and `final.pt` (`{"model": state_dict,
"epoch": N}`; the quantizer's buffers are `vq.embed` [K, D], `vq.cluster_size` [K],
`vq.embed_avg` [K, D], `vq.initted`), `probe.pt` (encoder outputs on held-out data, [N, 128]),
`metrics.json` (per-epoch numbers and a summary).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BUGS = ("zero-counts", "no-smoothing", "fp16-ema", "eval-shift", "kmeans-scale")


# ----------------------------------------------------------------------------- the quantizer
class VQEMA(nn.Module):
    """Euclidean VQ whose codebook is the EMA of the encoder outputs assigned to each code."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, eps: float = 1e-5,
                 bugs: tuple[str, ...] = (), replace_dead: bool = False) -> None:
        super().__init__()
        self.codebook_size, self.decay, self.eps = codebook_size, decay, eps
        self.bugs, self.replace_dead = set(bugs), replace_dead
        stats_dtype = torch.float16 if "fp16-ema" in self.bugs else torch.float32  # BUG fp16-ema
        self.register_buffer("embed", torch.zeros(codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size, dtype=stats_dtype))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim, dtype=stats_dtype))
        self.register_buffer("initted", torch.tensor(False))

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, generator: torch.Generator, iters: int = 10) -> None:
        """k-means++ seeding and `iters` Lloyd steps on `z` [N, D]."""
        k = self.codebook_size
        centers = z[torch.randint(0, z.shape[0], (1,), generator=generator)]
        d2 = (z - centers[0]).pow(2).sum(1)
        for _ in range(1, k):  # next centre drawn with probability proportional to D(x)^2
            i = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
            centers = torch.cat([centers, z[i]])
            d2 = torch.minimum(d2, (z - z[i]).pow(2).sum(1))
        for _ in range(iters):
            idx = torch.cdist(z, centers).argmin(1)
            bins = torch.bincount(idx, minlength=k).to(z.dtype)
            sums = torch.zeros_like(centers).index_add_(0, idx, z)
            centers = torch.where(bins[:, None] > 0, sums / bins.clamp(min=1)[:, None], centers)
        self.embed.copy_(centers)
        if "zero-counts" in self.bugs:  # BUG zero-counts: counts stay 0, embed_avg = embed
            self.embed_avg.copy_(centers)
        else:  # consistent statistics: embed == embed_avg / cluster_size
            self.cluster_size.copy_(bins)
            self.embed_avg.copy_(centers * bins[:, None])
        self.initted.fill_(True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through output, commitment MSE, code indices)."""
        zd = z.detach()
        dist = zd.pow(2).sum(1, keepdim=True) - 2 * zd @ self.embed.t() + self.embed.pow(2).sum(1)
        idx = dist.argmin(1)
        q = self.embed[idx]  # looked up before the EMA step, as every library does
        if self.training:
            self.ema_update(zd, idx)
        return z + (q - z).detach(), F.mse_loss(z, q), idx

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        dtype = self.cluster_size.dtype
        onehot = F.one_hot(idx, self.codebook_size).to(dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ z.to(dtype), alpha=1 - self.decay)
        if "no-smoothing" in self.bugs:  # BUG no-smoothing
            smoothed = self.cluster_size
        else:  # Laplace smoothing: keeps every count > 0 and their sum equal to n
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        if self.replace_dead:
            # Re-seed codes whose count fell below half the expected count n/K from the current
            # batch, resetting their statistics too (or the next EMA step undoes the re-seed).
            expected = z.shape[0] / self.codebook_size
            dead = self.cluster_size < 0.5 * expected
            if dead.any():
                pick = z[torch.randint(0, z.shape[0], (int(dead.sum()),))]
                self.embed[dead] = pick
                self.cluster_size[dead] = expected
                self.embed_avg[dead] = (pick * expected).to(dtype)


class Classifier(nn.Module):
    """encoder (MLP [+ LayerNorm]) -> vq (VQEMA) -> head (MLP) -> logits."""

    def __init__(self, in_dim: int, classes: int, *, dim: int = 128, hidden: int = 128,
                 codebook_size: int = 512, layernorm: bool = False, bugs: tuple[str, ...] = (),
                 replace_dead: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.ReLU(), nn.Linear(hidden, dim)]
        if layernorm:
            layers.append(nn.LayerNorm(dim))
        self.encoder = nn.Sequential(*layers)
        self.vq = VQEMA(codebook_size, dim, bugs=bugs, replace_dead=replace_dead)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (logits, commitment MSE, code indices)."""
        q, commit, idx = self.vq(self.encoder(x))
        return self.head(q), commit, idx


# ----------------------------------------------------------------------------- data, metrics
def make_data(seed: int, *, in_dim: int = 32, classes: int = 10, modes: int = 3,
              n_train: int = 10_240, n_test: int = 2_048) -> dict[str, torch.Tensor]:
    """10-class Gaussian mixture in raw "sensor" units, and its standardised version."""
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(classes, modes, in_dim, generator=g)
    n = n_train + n_test
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y, torch.randint(0, modes, (n,), generator=g)] + torch.randn(n, in_dim, generator=g)
    raw = x * (10 + 50 * torch.rand(in_dim, generator=g)) + 100 * torch.randn(in_dim, generator=g)
    mu, sd = raw[:n_train].mean(0), raw[:n_train].std(0)
    std = (raw - mu) / sd
    return {"x_train": std[:n_train], "y_train": y[:n_train], "x_test": std[n_train:],
            "y_test": y[n_train:], "raw_train": raw[:n_train], "raw_test": raw[n_train:]}


def perplexity(idx: torch.Tensor, k: int) -> float:
    """exp(entropy) of the code assignments."""
    p = torch.bincount(idx, minlength=k).double()
    p = p[p > 0] / p.sum()
    return math.exp(float(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- training
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bug", action="append", default=[], choices=BUGS,
                    help="switch a bug on (repeatable)")
    ap.add_argument("--fixed", action="store_true", help="apply the fix (see the docstring)")
    ap.add_argument("--no-replace", action="store_true",
                    help="with --fixed: fix the statistics and the eval mode only, no dead-code re-seeding")
    ap.add_argument("--layernorm", action="store_true", help="end the encoder with a LayerNorm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("runs/seed_report"))
    a = ap.parse_args()

    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and shares the machine
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    batch, k, warmup_epochs, commitment, clip = 512, 512, 5, 0.01, 1.0
    d = make_data(a.seed)
    x_tr, y_tr, y_te = d["x_train"], d["y_train"], d["y_test"]
    x_te = d["raw_test"] if "eval-shift" in a.bug else d["x_test"]  # BUG eval-shift
    bugs = tuple(a.bug)
    if a.fixed:  # the fix corrects the quantizer; the data bugs stay
        bugs = tuple(b for b in bugs if b in ("eval-shift", "kmeans-scale"))
    model = Classifier(x_tr.shape[1], 10, codebook_size=k, layernorm=a.layernorm, bugs=bugs,
                       replace_dead=a.fixed and not a.no_replace)
    with torch.no_grad():  # k-means++ init on the encoder outputs of 4 training batches
        x_init = d["raw_train"][: 4 * batch] if "kmeans-scale" in a.bug else x_tr[: 4 * batch]
        model.vq.kmeans_init(model.encoder(x_init), gen)  # BUG kmeans-scale: raw inputs
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    steps_per_epoch = x_tr.shape[0] // batch
    a.out.mkdir(parents=True, exist_ok=True)

    def evaluate() -> tuple[float, float, float]:
        """Held-out accuracy, loss and perplexity. Under no_grad, but the VQ stays in training
        mode (the story's setting), so these batches update its EMA statistics."""
        model.eval()
        if not a.fixed:
            model.vq.train()
        correct, loss_sum, idxs = 0, 0.0, []
        with torch.no_grad():
            for i in range(0, x_te.shape[0], batch):
                logits, _, idx = model(x_te[i:i + batch])
                loss_sum += float(F.cross_entropy(logits, y_te[i:i + batch], reduction="sum"))
                correct += int((logits.argmax(1) == y_te[i:i + batch]).sum())
                idxs.append(idx)
        model.train()
        return correct / len(y_te), loss_sum / len(y_te), perplexity(torch.cat(idxs), k)

    history: list[dict] = []
    acc, vloss, vppl = evaluate()  # epoch 0: the chance baseline
    print(f"epoch  0  eval acc {acc:.3f}  eval loss {vloss:.3g}  eval ppl {vppl:.1f}")
    step, t0, first_ppl, all_losses = 0, time.perf_counter(), None, []
    for epoch in range(1, a.epochs + 1):
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        losses, ppls = [], []
        for b in range(steps_per_epoch):
            i = perm[b * batch:(b + 1) * batch]
            weight = commitment * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))
            logits, commit, idx = model(x_tr[i])
            loss = F.cross_entropy(logits, y_tr[i]) + weight * commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            step += 1
            losses.append(loss.item())
            ppls.append(perplexity(idx, k))
            if first_ppl is None:
                first_ppl = ppls[0]
        acc, vloss, vppl = evaluate()
        with torch.no_grad():
            z_norm = float(model.encoder(x_tr[:batch]).norm(dim=1).median())
        all_losses += losses
        row = {"epoch": epoch, "step": step, "loss": sum(losses) / len(losses),
               "loss_max": float(torch.tensor(losses).max()),  # NaN-propagating, unlike max()
               "ppl": ppls[-1], "eval_acc": acc, "eval_loss": vloss, "eval_ppl": vppl,
               "z_norm": z_norm, "code_norm_max": float(model.vq.embed.float().norm(dim=1).max())}
        history.append(row)
        print(f"epoch {epoch:2d}  loss {row['loss']:.3g} (max {row['loss_max']:.3g})  "
              f"ppl {row['ppl']:.1f}  eval acc {acc:.3f}  eval ppl {vppl:.1f}  "
              f"|z| {z_norm:.3g}  max|e| {row['code_norm_max']:.3g}")
        if epoch == 1:
            torch.save({"model": model.state_dict(), "epoch": epoch}, a.out / "early.pt")
    torch.save({"model": model.state_dict(), "epoch": a.epochs}, a.out / "final.pt")
    with torch.no_grad():  # what the quantizer sees in training: the standardised held-out set
        torch.save(model.encoder(d["x_test"]).contiguous(), a.out / "probe.pt")
    counts = model.vq.cluster_size.float()
    expected = float(counts.sum()) / k
    summary = {
        "bugs": list(a.bug), "fixed": a.fixed, "replace": a.fixed and not a.no_replace,
        "layernorm": a.layernorm, "seed": a.seed,
        "first_batch_ppl": first_ppl, "final_ppl": history[-1]["ppl"],
        "final_eval_acc": history[-1]["eval_acc"], "max_loss": float(torch.tensor(all_losses).max()),
        "counts_zero": int((counts == 0).sum()),
        "counts_tiny": int(((counts > 0) & (counts < 0.01 * expected)).sum()),
        "max_code_norm": history[-1]["code_norm_max"], "seconds": time.perf_counter() - t0,
    }
    (a.out / "metrics.json").write_text(json.dumps({"summary": summary, "epochs": history}, indent=1))
    print("summary " + json.dumps(summary))


if __name__ == "__main__":
    main()
