"""Training scripts for the zero-code launcher tests, written to a temporary folder and run as
`vqdoctor watch -- python SCRIPT ...`. None of them imports vqdoctor: they stand for a user's
unmodified training script. The models come from `tests/watch/watch_models.py` (the Python-API
scenarios), found through the repository root given on the command line.
"""

from __future__ import annotations

SCENARIO = r'''
"""A tiny real training with a known failure: python scenario.py NAME REPO_ROOT LOSSES_JSON."""
import json
import os
import signal
import sys
import types

import torch

sys.path.insert(0, sys.argv[2])
from tests.watch.watch_models import (  # noqa: E402
    BrokenSTQuantizer, QuantAE, diffusers_vq, lucid_vq, make_data, train, unpack_diffusers)

torch.set_num_threads(1)
torch.manual_seed(0)
name, steps = sys.argv[1], 150
data = make_data(steps)
extra = {}


def encodec_rvq(**kw):
    # encodec's package __init__ imports torchaudio, which its quantizer never uses (and which
    # does not load beside this torch): a placeholder module stands in during the import
    placeholder = "torchaudio" not in sys.modules
    if placeholder:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        from encodec.quantization import core_vq
    finally:
        if placeholder:
            sys.modules.pop("torchaudio", None)
    return core_vq.ResidualVectorQuantization(**kw)


def healthy_lucid():
    return QuantAE(lucid_vq(codebook_size=32, kmeans_init=True, threshold_ema_dead_code=2, decay=0.8))


if name == "healthy":
    model = healthy_lucid()
elif name == "dead-codes":  # a 64-d N(0, 1) codebook, no k-means, no replacement; killed at step 110
    vq = lucid_vq(dim=64, codebook_size=256, kmeans_init=False, threshold_ema_dead_code=0, decay=0.99)
    with torch.no_grad():
        vq._codebook.embed.normal_()
        # keep the EMA sums consistent with the counts (ones before vector-quantize-pytorch 1.34,
        # zeros since): embed_avg = embed * cluster_size under either arithmetic
        vq._codebook.embed_avg.copy_(vq._codebook.embed * vq._codebook.cluster_size[..., None])
    model = QuantAE(vq, code_dim=64, z_scale=4.0)

    def kill(i):
        if i == 110:
            os.kill(os.getpid(), signal.SIGKILL)

    extra["hook"] = kill
elif name == "scale-mismatch":  # diffusers' uniform(+-1/K) codebook against encoder outputs x100
    model = QuantAE(diffusers_vq(), layout="bdhw", unpack=unpack_diffusers, z_scale=100.0)
elif name == "eval-mutation":  # the VQ left in training mode for no-grad evaluation passes
    model = healthy_lucid()
    held_out = make_data(3, seed=7, scale=20.0)  # far from the training data: it drags the codes

    def evaluate(i):
        if i % 20 == 10:
            with torch.no_grad():
                for x in held_out:
                    model(x)

    extra["hook"] = evaluate
elif name == "non-finite":  # inf in the inputs from step 80; the script then exits 3
    model = healthy_lucid()
    for x in data[80:]:
        x[0, 0, 0] = float("inf")
elif name == "no-encoder-gradient":  # no z + (q - z).detach(), no commitment term
    model = QuantAE(BrokenSTQuantizer(beta=0.0), name="quantize", unpack=lambda o: (o[0], o[1]))
elif name == "frozen-codebook":  # encodec's RVQ with EMA decay 1.0: the codebooks never move
    model = QuantAE(encodec_rvq(num_quantizers=2, dim=16, codebook_size=32, decay=1.0,
                                threshold_ema_dead_code=0), layout="bdn")
elif name == "loss-divergence":  # SGD at lr 5; the script then raises
    model = healthy_lucid()
    extra.update(lr=5.0, sgd=True)
else:
    raise SystemExit(f"unknown scenario {name}")

losses = train(model, data, **extra)
with open(sys.argv[3], "w") as f:
    json.dump(losses, f)
print(f"trained {name}")
if name == "non-finite":
    sys.exit(3)
if name == "loss-divergence":
    raise RuntimeError("the loss diverged")
'''

DDP = r'''
"""Data-parallel VQ-EMA training on CPU (gloo), or the same data in one process.

python train_ddp.py MODE, MODE one of: "sync" (EMA statistics all-reduced, so every rank keeps
the same codebook), "desync" (each rank updates its EMA from its own shard only), "single" (one
process, both shards of each step in one batch).
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
MODE = sys.argv[1]
STEPS, TOKENS, K, D = 60, 64, 32, 8  # TOKENS per rank and step
if MODE == "single":
    rank, world = 0, 1
else:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()


class EMAQuantizer(nn.Module):
    def __init__(self, sync):
        super().__init__()
        self.sync, self.decay = sync, 0.9
        embed = torch.randn(K, D, generator=torch.Generator().manual_seed(0)) * 3
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, z):
        idx = torch.cdist(z, self.embed).argmin(1)
        q = self.embed[idx]
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx, K).to(z.dtype)
                counts, sums = onehot.sum(0), onehot.t() @ z
                if self.sync and dist.is_initialized():
                    dist.all_reduce(counts)
                    dist.all_reduce(sums)
                self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                smoothed = (self.cluster_size + 1e-5) / (n + K * 1e-5) * n
                self.embed.copy_(self.embed_avg / smoothed[:, None])
        return z + (q - z).detach(), idx


class Model(nn.Module):
    def __init__(self, sync):
        super().__init__()
        self.quantizer = EMAQuantizer(sync)
        self.decoder = nn.Linear(D, D)

    def forward(self, x):
        q, idx = self.quantizer(x)  # the inputs stand for the outputs of a fixed encoder
        return self.decoder(q), idx


model = Model(sync=MODE != "desync")
if world > 1:
    model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
g = torch.Generator().manual_seed(1)
centres = torch.randn(16, D, generator=g) * 4
for step in range(STEPS):
    x = centres[torch.randint(0, 16, (2 * TOKENS,), generator=g)] + 0.3 * torch.randn(2 * TOKENS, D, generator=g)
    if world > 1:
        x = x[rank * TOKENS:(rank + 1) * TOKENS]
    y, _ = model(x)
    loss = F.mse_loss(y, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
if world > 1:
    dist.destroy_process_group()
'''

ROOTS = r'''
"""Which module is the model: a loss module and an encoder run alone at top level first (no
quantizer: skipped), an evaluation pass before training, then the training."""
import sys

import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)


class VQ(nn.Module):
    def __init__(self, K=16, D=8):
        super().__init__()
        self.embedding = nn.Embedding(K, D)

    def forward(self, z):
        idx = torch.cdist(z, self.embedding.weight).argmin(-1)
        q = self.embedding(idx)
        loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), loss, idx


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.vq = VQ()
        self.decoder = nn.Linear(8, 4)

    def forward(self, x):
        q, aux, _ = self.vq(self.encoder(x))
        return self.decoder(q), aux


model = AE()
criterion = nn.MSELoss()
x0 = torch.randn(32, 4)
criterion(x0, x0)          # a root without a quantizer
model.encoder(x0)          # another one
model.eval()
with torch.no_grad():
    model(x0)              # the model's first forward: the watch attaches here
model.train()
opt = torch.optim.Adam(model.parameters(), 1e-2)
for step in range(int(sys.argv[1])):
    x = torch.randn(64, 4)
    y, aux = model(x)
    loss = criterion(y, x) + aux
    opt.zero_grad()
    loss.backward()
    opt.step()
print("roots ok")
'''
