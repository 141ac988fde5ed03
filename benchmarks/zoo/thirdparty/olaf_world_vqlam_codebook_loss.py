"""showlab/Olaf-World at 3729342: the VQ latent action model's codebook loss reads the
straight-through output, so the codebook never receives a gradient (issue #8).

Follows `lam/modules/vq_lam.py`, `lam/modules/blocks.py` (`VectorQuantizer`) and
`lam/vq_model.py` (`VQLAM`, a LightningModule) of https://github.com/showlab/Olaf-World at
commit 3729342d42722e8c2d3ac8db2bc5f53c09d30d08, rewritten here and scaled down (model_dim 64,
one encoder and one decoder block, latent_dim 16, 32 codes, 4-frame 16x16 videos, patch 4): an
action-prompt token is prepended to each frame's patches, a transformer encodes them, the prompt
token of frames 1..T-1 goes through `pre_vq` (Linear + LayerNorm) into the `VectorQuantizer`
(uniform(+-1/K) init, `cdist` lookup, straight-through `z_q = x + (z - x).detach()`, a
non-persistent usage buffer), and the decoder predicts the next frames from the current patches
plus the action. Optimizer as in `configure_optimizers`: AdamW with the codebook in its own
group (4x the learning rate, no weight decay). Checkpoints are Lightning-style
(`{'state_dict': ..., 'epoch', 'global_step', 'optimizer_states', 'hyper_parameters'}`, keys
under `vq_lam.`).

The reported bug: `codebook_loss = F.mse_loss(z_q, z_e.detach())` with `z_q` the
straight-through output, in which the looked-up code appears only inside `.detach()`, so no
term reaches `vq.codebook.weight` and the codebook stays at its uniform(+-1/K) initialisation
while the reconstruction loss still falls. `--fixed` computes the codebook and commitment terms
on the looked-up codes `z`, which `VectorQuantizer.forward` already returns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, write_reference  # noqa: E402

CASE = {
    "repo": "showlab/Olaf-World",
    "commit": "3729342d42722e8c2d3ac8db2bc5f53c09d30d08",
    "issue": "issue #8",
    "expect": "frozen-codebook",
    "learn": "grad",
    "K": 32, "stages": 1,
    "fault": "codebook loss computed on the straight-through output: the codebook gets no gradient",
}
K, LATENT, MODEL, PATCH, T, HW = 32, 16, 64, 4, 4, 16


def patchify(videos: torch.Tensor, size: int) -> torch.Tensor:
    B, T_, H, W, C = videos.shape
    x = videos.reshape(B, T_, H // size, size, W // size, size, C).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T_, (H // size) * (W // size), size * size * C)


def unpatchify(patches: torch.Tensor, size: int, H: int, W: int) -> torch.Tensor:
    B, T_, N, _ = patches.shape
    x = patches.reshape(B, T_, H // size, W // size, size, size, -1).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T_, H, W, -1)


class Blocks(nn.Module):
    """Transformer over all tokens of a clip (stands in for the spatio-temporal blocks)."""

    def __init__(self, in_dim: int, model_dim: int, out_dim: int, num_blocks: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, model_dim)
        layer = nn.TransformerEncoderLayer(model_dim, 4, 2 * model_dim, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_blocks, enable_nested_tensor=False)
        self.out = nn.Linear(model_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T_, N, _ = x.shape
        h = self.blocks(self.inp(x).reshape(B, T_ * N, -1))
        return self.out(h).reshape(B, T_, N, -1)


class VectorQuantizer(nn.Module):
    def __init__(self, num_latents: int, latent_dim: int, code_restart: bool = False):
        super().__init__()
        self.codebook = nn.Embedding(num_latents, latent_dim)
        self.codebook.weight.data.uniform_(-1.0 / num_latents, 1.0 / num_latents)
        self.register_buffer("usage", torch.zeros(num_latents), persistent=False)
        self.num_latents, self.code_restart = num_latents, code_restart

    def forward(self, x: torch.Tensor):
        distance = torch.cdist(x.float(), self.codebook.weight.float())
        indices = torch.argmin(distance, dim=1)
        z = F.embedding(indices, self.codebook.weight)
        if not self.training or self.code_restart:
            self.usage.index_add_(0, indices, torch.ones_like(indices, dtype=self.usage.dtype))
        z_q = x + (z - x).detach()
        return z_q, z, x, indices


class VQLatentActionModel(nn.Module):
    def __init__(self, fixed: bool = False, commitment_cost: float = 0.25):
        super().__init__()
        token = 3 * PATCH * PATCH
        self.fixed, self.commitment_cost = fixed, commitment_cost
        self.action_prompt = nn.Parameter(torch.empty(1, 1, 1, token))
        nn.init.uniform_(self.action_prompt, a=-1, b=1)
        self.encoder = Blocks(token, MODEL, MODEL, 1)
        self.pre_vq = nn.Sequential(nn.Linear(MODEL, LATENT), nn.LayerNorm(LATENT))
        self.vq = VectorQuantizer(K, LATENT, code_restart=True)
        self.patch_up = nn.Linear(token, MODEL)
        self.action_up = nn.Linear(LATENT, MODEL)
        self.decoder = Blocks(MODEL, MODEL, token, 1)

    def encode(self, videos: torch.Tensor) -> dict:
        B = videos.shape[0]
        patches = patchify(videos, PATCH)
        padded = torch.cat([self.action_prompt.expand(B, T, -1, -1), patches], dim=2)
        z = self.encoder(padded)[:, 1:, 0].reshape(B * (T - 1), MODEL)
        z_e = self.pre_vq(z)
        z_q, z_code, _, indices = self.vq(z_e)
        return {"patches": patches, "z_rep": z_q.reshape(B, T - 1, 1, LATENT), "z_code": z_code,
                "z_e": z_e, "indices": indices}

    def forward(self, videos: torch.Tensor) -> dict:
        out = self.encode(videos)
        video_action = self.patch_up(out["patches"][:, :-1]) + self.action_up(out["z_rep"])
        recon = torch.sigmoid(self.decoder(video_action))
        z_e = out["z_e"]
        z_q = out["z_code"] if self.fixed else out["z_rep"].reshape(-1, LATENT)  # THE BUG: the ST output
        commitment_loss = F.mse_loss(z_q.detach(), z_e)
        codebook_loss = F.mse_loss(z_q, z_e.detach())
        out.update(recon=unpatchify(recon, PATCH, HW, HW), vq_loss=codebook_loss + self.commitment_cost * commitment_loss)
        return out


class VQLAM(nn.Module):
    """The LightningModule's state: `vq_lam` holds the model (checkpoint keys `vq_lam.*`)."""

    def __init__(self, fixed: bool):
        super().__init__()
        self.vq_lam = VQLatentActionModel(fixed)
        self.vq_beta = 1.0


def videos(g: torch.Generator, n: int) -> torch.Tensor:
    """A bright square moved by one of 8 actions per frame on a noisy background, [B, T, H, W, 3]."""
    moves = torch.tensor([[0, 1], [1, 0], [0, -1], [-1, 0], [1, 1], [-1, -1], [1, -1], [-1, 1]]) * 2
    pos = torch.randint(3, HW - 7, (n, 2), generator=g)
    colour = torch.rand(n, 3, generator=g)
    frames = []
    for _ in range(T):
        f = 0.1 * torch.rand(n, HW, HW, 3, generator=g)
        for b in range(n):
            y, x = pos[b].tolist()
            f[b, y:y + 4, x:x + 4] = colour[b]
        frames.append(f)
        pos = (pos + moves[torch.randint(0, 8, (n,), generator=g)]).clamp(0, HW - 4)
    return torch.stack(frames, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixed", action="store_true", help="codebook / commitment terms on the looked-up codes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    module = VQLAM(args.fixed)
    codebook_params, other = [], []
    for name, p in module.named_parameters():
        (codebook_params if "vq.codebook" in name else other).append(p)
    opt = torch.optim.AdamW([{"params": other, "lr": 1e-3, "weight_decay": 1e-2},
                             {"params": codebook_params, "lr": 4e-3, "weight_decay": 0.0}])
    steps = 150
    rec = Recorder(K, 1, steps)
    rec.initial(module.vq_lam.vq.codebook.weight)
    files = {}

    def save(name: str, step: int) -> None:  # Lightning's checkpoint layout
        torch.save({"epoch": step // 50, "global_step": step, "pytorch-lightning_version": "2.4.0",
                    "state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()],
                    "lr_schedulers": [], "hyper_parameters": {"num_embeddings": K, "commitment_cost": 0.25}},
                   out / name)

    for step in range(steps):
        batch = {"videos": videos(g, 64)}
        outputs = module.vq_lam(batch["videos"])
        mse_loss = ((batch["videos"][:, 1:] - outputs["recon"]) ** 2).mean()
        loss = mse_loss + module.vq_beta * outputs["vq_loss"]
        if step % 10 == 0:
            rec.task_grad(step, torch.autograd.grad(mse_loss, outputs["z_e"], retain_graph=True, allow_unused=True)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.codes(step, outputs["indices"].reshape(-1, 1))
        rec.end_step(step, float(loss.detach()), float(mse_loss.detach()), outputs["z_e"].detach(),
                     module.vq_lam.vq.codebook.weight)
        if step == 49:
            save("early.ckpt", step)
            files["early"] = "early.ckpt"
        if (step + 1) % 50 == 0:  # on_train_epoch_end
            module.vq_lam.vq.usage.zero_()
    save("final.ckpt", steps - 1)
    files["final"] = "final.ckpt"
    module.eval()
    with torch.no_grad():
        z_e = module.vq_lam.encode(videos(g, 256))["z_e"]  # 768 latent actions
    torch.save(z_e, out / "probe.pt")
    files["probe"] = "probe.pt"
    write_reference(out, rec, module.vq_lam.vq.codebook.weight, files, {"fixed": args.fixed})


if __name__ == "__main__":
    main()
