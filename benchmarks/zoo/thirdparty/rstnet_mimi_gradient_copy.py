"""yangdongchao/RSTnet at 517f3a7: the MimiCodec quantizer has no gradient copy, so the encoder
gets no task gradient and every frame maps to one index (issue #2).

Follows `AudioCodec/MimiCodec/quantization/core_vq.py` and `vq.py` of
https://github.com/yangdongchao/RSTnet at commit 517f3a7b70339e728ffad06c1fe5b309b49dcfbf
(the buggy state) and its fix in c9eda43 / b424e93 ("fix error in vq training", "revise vq
training error", 2024-10-08), rewritten here and scaled down: a 1-d conv encoder / decoder on
synthetic mono audio around a `SplitResidualVectorQuantizer` (one semantic `rvq_first` codebook
plus three acoustic `rvq_rest` codebooks, 64 codes of dimension 16 each, 1x1 conv input /
output projections from 32 channels).

The buggy state is Mimi's inference-only quantizer used for training: `VectorQuantization`
returns the looked-up codes with no `x + (q - x).detach()`, `ResidualVectorQuantization`
detaches every stage's output, the loss is `zero_scalar`, and `EuclideanCodebook` never
updates (its `embedding = embedding_sum / cluster_usage` starts at zeros). The maintainer's
reply in issue #2: "We find that we forget to add the gradient copy operation in core_vq.py".
`--fixed` is the code after b424e93: an EMA `EuclideanCodebook` (`inited`, `cluster_size`,
`embed`, `embed_avg`, its default uniform init), the gradient copy in training and no detach
between stages in training.

Expected answer: `no-encoder-gradient` (the reported root cause). The same state also leaves
the codebook frozen at zeros, so `frozen-codebook` is accepted as a correct first answer too.
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
    "repo": "yangdongchao/RSTnet",
    "commit": "517f3a7b70339e728ffad06c1fe5b309b49dcfbf",
    "issue": "issue #2",
    "expect": "no-encoder-gradient",
    "accept": ["frozen-codebook"],
    "learn": "ema",
    "K": 64, "stages": 4,
    "fault": "no gradient copy in VectorQuantization, stages detached, codebook never updated (zeros)",
}
K, DIM, CH, NQ = 64, 16, 32, 4


def zero_scalar(device) -> torch.Tensor:
    return torch.zeros([1], device=device)[0]


class InferenceCodebook(nn.Module):
    """517f3a7: buffers `_initialized`, `cluster_usage`, `embedding_sum`; no update in forward."""

    def __init__(self, dim: int, codebook_size: int, epsilon: float = 1e-5):
        super().__init__()
        self.epsilon = epsilon
        self.register_buffer("_initialized", torch.tensor([False], dtype=torch.float))
        self.register_buffer("cluster_usage", torch.ones(codebook_size))
        self.register_buffer("embedding_sum", torch.zeros(codebook_size, dim))

    @property
    def embedding(self) -> torch.Tensor:
        return self.embedding_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        codes = torch.cdist(flat[None], self.embedding[None], p=2)[0].argmin(dim=-1)
        return F.embedding(codes, self.embedding).view(x.shape), codes.view(x.shape[:-1])


class EMACodebook(nn.Module):
    """b424e93: `inited`, `cluster_size`, `embed`, `embed_avg`; EMA update with Laplace smoothing."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, epsilon: float = 1e-5,
                 threshold_ema_dead_code: float = 2):
        super().__init__()
        self.decay, self.epsilon, self.codebook_size = decay, epsilon, codebook_size
        self.threshold_ema_dead_code = threshold_ema_dead_code
        embed = torch.empty(codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        self.register_buffer("inited", torch.Tensor([True]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())

    @property
    def embedding(self) -> torch.Tensor:
        return self.embed

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        dist = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1))
        codes = dist.max(dim=-1).indices
        onehot = F.one_hot(codes, self.codebook_size).type(flat.dtype)
        quantize = F.embedding(codes, self.embed).view(x.shape)
        if self.training:
            with torch.no_grad():
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_((flat.t() @ onehot).t(), alpha=1 - self.decay)
                n = self.cluster_size.sum()
                cs = (self.cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
                self.embed.copy_(self.embed_avg / cs.unsqueeze(1))
                expired = self.cluster_size < self.threshold_ema_dead_code
                if expired.any():  # replaces `embed` only, as the repository does
                    idx = torch.randint(0, flat.shape[0], (self.codebook_size,))
                    self.embed.copy_(torch.where(expired[:, None], flat[idx], self.embed))
        return quantize, codes.view(x.shape[:-1])


class VectorQuantization(nn.Module):
    def __init__(self, fixed: bool):
        super().__init__()
        self.fixed = fixed
        self._codebook = EMACodebook(DIM, K) if fixed else InferenceCodebook(DIM, K)

    def forward(self, x: torch.Tensor):
        x = x.transpose(1, 2)  # b d n -> b n d
        quantized, codes = self._codebook(x)
        loss = zero_scalar(x.device)
        if self.fixed and self.training:  # the gradient copy added by the fix
            quantized = x + (quantized - x).detach()
        return quantized.transpose(1, 2), codes, loss


class ResidualVectorQuantization(nn.Module):
    def __init__(self, num_quantizers: int, fixed: bool):
        super().__init__()
        self.fixed = fixed
        self.layers = nn.ModuleList([VectorQuantization(fixed) for _ in range(num_quantizers)])

    def forward(self, x: torch.Tensor):
        quantized_out, residual, codes, losses = 0.0, x, [], []
        for layer in self.layers:
            quantized, c, loss = layer(residual)
            if not (self.fixed and self.training):
                quantized = quantized.detach()  # 517f3a7 detaches every stage
            residual = residual - quantized
            quantized_out = quantized_out + quantized
            codes.append(c)
            losses.append(loss)
        return quantized_out, torch.stack(codes), torch.stack(losses)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, n_q: int, fixed: bool):
        super().__init__()
        self.input_proj = nn.Conv1d(CH, DIM, 1, bias=False)
        self.output_proj = nn.Conv1d(DIM, CH, 1, bias=False)
        self.vq = ResidualVectorQuantization(n_q, fixed)

    def forward(self, x: torch.Tensor):
        quantized, codes, loss = self.vq(self.input_proj(x))
        return self.output_proj(quantized), codes, loss.mean()


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(self, n_q: int = NQ, n_q_semantic: int = 1, fixed: bool = False):
        super().__init__()
        self.rvq_first = ResidualVectorQuantizer(n_q_semantic, fixed)
        self.rvq_rest = ResidualVectorQuantizer(n_q - n_q_semantic, fixed)

    def forward(self, x: torch.Tensor):
        q1, c1, l1 = self.rvq_first(x)
        q2, c2, l2 = self.rvq_rest(x)
        return q1 + q2, torch.cat([c1, c2], 0), l1 + l2


class MimiLike(nn.Module):
    def __init__(self, fixed: bool):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(1, 16, 7, padding=3), nn.ELU(), nn.Conv1d(16, CH, 4, 2, 1), nn.ELU(),
                                     nn.Conv1d(CH, CH, 4, 2, 1))
        self.quantizer = SplitResidualVectorQuantizer(fixed=fixed)
        self.decoder = nn.Sequential(nn.ConvTranspose1d(CH, CH, 4, 2, 1), nn.ELU(), nn.ConvTranspose1d(CH, 16, 4, 2, 1),
                                     nn.ELU(), nn.Conv1d(16, 1, 7, padding=3))

    def forward(self, wav: torch.Tensor):
        emb = self.encoder(wav)
        q, codes, commit = self.quantizer(emb)
        return self.decoder(q), codes, commit, emb


def audio(g: torch.Generator, n: int, t: int = 256) -> torch.Tensor:
    """Mono 'speech-like' audio: 3 random sinusoids under a random envelope, [n, 1, t]."""
    tt = torch.arange(t).float()
    f = torch.rand(n, 3, 1, generator=g) * 0.4
    ph = torch.rand(n, 3, 1, generator=g) * 6.283
    env = torch.rand(n, 1, 1, generator=g) + 0.3
    return (env * torch.sin(f * tt + ph)).sum(1, keepdim=True) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixed", action="store_true", help="the code after b424e93")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    model = MimiLike(args.fixed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    steps = 150
    rec = Recorder(K, NQ, steps)
    first = model.quantizer.rvq_first.vq.layers[0]._codebook
    rec.initial(first.embedding)
    files = {}
    for step in range(steps):
        wav = audio(g, 16)
        recon, codes, commit, emb = model(wav)
        task = F.l1_loss(recon, wav) + F.mse_loss(recon, wav)
        loss = task + commit
        if step % 10 == 0:
            rec.task_grad(step, torch.autograd.grad(task, emb, retain_graph=True, allow_unused=True)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.codes(step, codes.permute(1, 2, 0).reshape(-1, NQ))
        zin = model.quantizer.rvq_first.input_proj(emb).detach().transpose(1, 2).reshape(-1, DIM)
        rec.end_step(step, float(loss.detach()), float(task.detach()), zin, first.embedding)
        if step == 49:
            torch.save({"model": {"generator": model.state_dict()}, "step": step}, out / "early.pt")
            files["early"] = "early.pt"
    torch.save({"model": {"generator": model.state_dict()}, "step": steps - 1}, out / "final.pt")
    files["final"] = "final.pt"
    model.eval()
    with torch.no_grad():
        emb = model.encoder(audio(g, 64))  # [64, 32, 64]: 4096 frames
    torch.save(emb.transpose(1, 2).reshape(-1, CH), out / "probe.pt")
    files["probe"] = "probe.pt"
    write_reference(out, rec, first.embedding, files, {"fixed": args.fixed})


if __name__ == "__main__":
    main()
