"""Rank desync: two data-parallel ranks each update their own EMA codebook, never all-reduced.

Fault: the model is wrapped in `DistributedDataParallel(..., broadcast_buffers=False)` (a
common speed-up) and the quantizer is built with `sync_codebook=False` (the setting of older
vector-quantize-pytorch versions and of many hand-written EMA quantizers). DDP all-reduces
gradients only; the EMA codebook is a buffer updated outside autograd, so each rank's codebook
follows its own shard of the data. The same input gets different codes on different ranks, and
the checkpoint written by rank 0 describes only half of the data. Run with
`python -m torch.distributed.run --nproc_per_node 2 vq011_rank_desync_lucidrains.py --out DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from vector_quantize_pytorch import VectorQuantize

SCENARIO = {
    "expect": "rank-desync",
    "onset": 0,
    "library": "vector-quantize-pytorch",
    "family": "vq-ema",
    "K": 512, "D": 32, "tokens_per_step": 1024, "steps": 150,
    "launch": "torchrun2",
    "fault": "DDP(broadcast_buffers=False) + sync_codebook=False: each rank keeps its own EMA codebook",
}


class AE(nn.Module):
    def __init__(self, d_in: int = 16, dim: int = 32, K: int = 512):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, dim))
        self.vq = VectorQuantize(dim=dim, codebook_size=K, decay=0.8, kmeans_init=True, commitment_weight=0.25,
                                 sync_codebook=False, sync_kmeans=False)  # BUG: nothing all-reduces the EMA
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, d_in))

    def forward(self, x):
        z = self.encoder(x)
        q, idx, commit = self.vq(z)
        return self.decoder(q), commit, idx


def batch(mix: torch.Tensor, g: torch.Generator, n: int = 1024) -> torch.Tensor:
    s = torch.randn(1, n, mix.shape[0], generator=g)
    return 2 * torch.tanh(s @ mix)  # [1, n, 16], 6 latent factors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # same init on every rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = torch.randn(6, 16, generator=torch.Generator().manual_seed(args.seed)) / 6 ** 0.5
    g = torch.Generator().manual_seed(args.seed * 100 + rank)  # each rank its own data shard
    model = DDP(AE(), broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cb = model.module.vq._codebook
    for step in range(SCENARIO["steps"]):
        x = batch(mix, g)
        recon, commit, idx = model(x)
        loss = F.mse_loss(recon, x) + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 30 == 0 or step == SCENARIO["steps"] - 1:
            mine = cb.embed.detach().clone()
            other = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(other, mine)  # for the printout only
            diff = (other[1] - other[0]).norm(dim=-1).max() / other[0].norm(dim=-1).median()
            if rank == 0:
                print(f"step {step:4d} loss {loss.item():.4f} codes used {idx.unique().numel():3d}/512 "
                      f"max |e_rank1 - e_rank0| / median |e| = {diff.item():.3g} (encoder weights: DDP-synced)")
        if step == 30 and rank == 0:
            torch.save(model.module.state_dict(), out / "early.pt")
    if rank == 0:
        torch.save(model.module.state_dict(), out / "final.pt")
        with torch.no_grad():
            z = model.module.encoder(batch(mix, g, n=4096))[0]  # 4096 held-out vectors = 8 K
        torch.save(z, out / "probe.pt")
    torch.save(model.module.state_dict(), out / f"final.rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        a, b = (torch.load(out / f"final.rank{r}.pt") for r in range(2))
        e0, e1 = a["vq._codebook.embed"], b["vq._codebook.embed"]
        print(f"mechanism: final codebooks differ across ranks by up to "
              f"{((e1 - e0).norm(dim=-1).max() / e0.norm(dim=-1).median()).item():.3g} x the median code norm; "
              f"encoder weights identical across ranks: {torch.equal(a['encoder.0.weight'], b['encoder.0.weight'])}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
