"""VQ004 ema-divergence: EMA statistics updated by evaluation passes on another distribution (lucidrains).

The user story's classifier: 128-d encoder -> 128-d `VectorQuantize` (EMA decay 0.99, k-means init,
commitment 0.01, dead-code replacement below 2) -> MLP head, Adam 1e-3 with clipping 1.0. Every
25 steps it is evaluated on a validation set recorded under other conditions (the same 10 classes,
3x the gain and offset), under `torch.no_grad()` but without `model.eval()`: in training mode the
quantizer runs its EMA update and its dead-code replacement on the validation batches, so each
evaluation pulls codes towards the validation distribution and re-seeds dead codes with validation
vectors, which the training data then never use. Measured per evaluation: how far the codebook
moves (vs a training step) and the training perplexity before / after. Onset 24: the first
evaluation runs after the optimizer step of step 24.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "ema-divergence",
    "onset": 24,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 128, "D": 128, "tokens_per_step": 1024, "steps": 200,
    "launch": "python",
    "fault": "VQ left in training mode during no_grad evaluation every 25 steps on a 3x-gain validation set",
}
K, D, IN, CLASSES, BATCH, STEPS, EVAL_EVERY, EVAL_BATCHES = 128, 128, 32, 10, 1024, 200, 25, 10


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 128), nn.GELU(), nn.Linear(128, D))
        self.vq = VectorQuantize(dim=D, codebook_size=K, decay=0.99, kmeans_init=True, commitment_weight=0.01,
                                 threshold_ema_dead_code=2)
        self.head = nn.Sequential(nn.Linear(D, 128), nn.GELU(), nn.Linear(128, CLASSES))

    def forward(self, x):
        q, idx, commit = self.vq(self.encoder(x).unsqueeze(0))
        return self.head(q.squeeze(0)), commit, idx.flatten()


def perplexity(idx: torch.Tensor, k: int) -> float:
    p = torch.bincount(idx, minlength=k).float() / idx.numel()
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(17000 + args.seed)
    centres = torch.randn(CLASSES, 8, IN, generator=g)  # 10 classes x 8 sub-clusters

    def batch(n, gain=1.0, offset=0.0):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        x = centres[y, torch.randint(0, 8, (n,), generator=g)] + 0.4 * torch.randn(n, IN, generator=g)
        return gain * x + offset, y

    val = [batch(BATCH, gain=3.0, offset=1.0) for _ in range(EVAL_BATCHES)]  # other recording conditions
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    embed = model.vq._codebook.embed
    train_move = 0.0
    t0 = time.time()
    for step in range(STEPS):
        if step > 0 and step % EVAL_EVERY == 0:  # THE BUG: no model.eval() around the evaluation
            before = embed.detach().clone()
            with torch.no_grad():
                acc = sum((model(x)[0].argmax(1) == y).float().mean().item() for x, y in val) / len(val)
            moved = (embed - before).norm(dim=-1).mean().item()
            print(f"  eval at step {step}: val acc {acc:.2f}, codebook moved {moved:.3f} per code "
                  f"(one training step: {train_move:.4f})", flush=True)
        x, y = batch(BATCH)
        before = embed.detach().clone()
        logits, commit, idx = model(x)
        train_move = (embed - before).norm(dim=-1).mean().item()
        loss = F.cross_entropy(logits, y) + commit
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % EVAL_EVERY in (0, 1) or step == STEPS - 1:
            print(f"step {step:4d} loss {loss.item():.4f} acc {(logits.argmax(1) == y).float().mean():.2f} "
                  f"perplexity {perplexity(idx, K):6.1f} used {idx.unique().numel()}/{K}", flush=True)
        if step == 20:
            torch.save(model.state_dict(), out / "early.pt")

    model.eval()
    with torch.no_grad():
        z = model.encoder(batch(16 * K)[0])  # training distribution, 2048 vectors = 16 K
        idx = model.vq(z.unsqueeze(0))[1].flatten()
    print(f"held-out (training distribution): perplexity {perplexity(idx, K):.1f} used {idx.unique().numel()}/{K}; "
          f"time {time.time() - t0:.1f}s")
    torch.save(model.state_dict(), out / "final.pt")
    torch.save(z, out / "probe.pt")


if __name__ == "__main__":
    main()
