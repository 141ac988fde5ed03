"""The real libraries' quantizers (and the hand-written ones) behind one small handle.

`build(spec, settings)` returns a `Handle` whose `module` is the library's own quantizer module
(it is what the training script calls, so hooks and checkpoints see the library's class and
layout). The handle only adapts layouts: the training script works on `[B, T, D]` tokens; the
handle calls `module` in the library's layout and returns `(zq [B, T, D], idx [B, T, stages],
aux_loss)`. It also exposes the codebook(s) for the reference measurements, which read the
module's own tensors, never vqdoctor.

Libraries are imported lazily: a run imports only the one it trains.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def encodec_core_vq() -> Any:
    """encodec's `core_vq`, imported without torchaudio (its package __init__ imports torchaudio
    for audio I/O the quantizer never uses; a placeholder stands in during the import)."""
    if "encodec.quantization.core_vq" in sys.modules:
        return sys.modules["encodec.quantization.core_vq"]
    placeholder = "torchaudio" not in sys.modules
    if placeholder:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        from encodec.quantization import core_vq
    finally:
        if placeholder:
            sys.modules.pop("torchaudio", None)
    return core_vq


def vqp_version() -> str | None:
    """The vector-quantize-pytorch version this interpreter loads (an overlay on PYTHONPATH wins)."""
    try:
        return importlib.metadata.version("vector-quantize-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Handle:
    """One quantizer: the module, how to call it, and where its codebooks live."""

    module: nn.Module
    K: int
    stages: int
    call: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    codebooks: Callable[[], list[torch.Tensor]]  # [K, Dc] per stage (empty: no codebook)
    codebook_params: Callable[[], list[nn.Parameter]]  # gradient-trained codebook tensors
    to_code_space: Callable[[torch.Tensor], torch.Tensor] = lambda z: z  # [N, D] -> [N, Dc]
    set_rows: Callable[[torch.Tensor], None] | None = None  # write K rows [K, Dc] into stage 0
    cosine: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.call(self.module, z)


def _zero(z: torch.Tensor) -> torch.Tensor:
    return z.new_zeros(())


def _lucid(kind: str, spec: dict, s: Any) -> Handle:
    import vector_quantize_pytorch as vqp

    K, D, Q = spec["K"], spec["D"], spec["stages"]
    ver = vqp_version() or "?"
    new = not ver.startswith("1.32")
    if kind in ("lucid-fsq", "lucid-lfq", "lucid-simvq"):
        if kind == "lucid-fsq":
            m = vqp.FSQ(levels=spec["levels"], dim=D)

            def call(mod, z):
                q, idx = mod(z)
                return q, idx.long().unsqueeze(-1), _zero(z)
            return Handle(m, K, 1, call, lambda: [], lambda: [], info={"version": ver})
        if kind == "lucid-lfq":
            m = vqp.LFQ(dim=D, codebook_size=K, entropy_loss_weight=0.1, commitment_loss_weight=s.commitment)

            def call(mod, z):
                q, idx, aux = mod(z)
                return q, idx.long().unsqueeze(-1), aux
            return Handle(m, K, 1, call, lambda: [], lambda: [], info={"version": ver})
        m = vqp.SimVQ(dim=D, codebook_size=K, commitment_weight=s.commitment)

        def call(mod, z):
            q, idx, aux = mod(z)
            return q, idx.long().unsqueeze(-1), aux

        def cbs():
            with torch.no_grad():
                return [m.code_transform(m.frozen_codebook).detach()]
        return Handle(m, K, 1, call, cbs, lambda: [m.code_transform.weight], info={"version": ver})

    kw: dict[str, Any] = dict(codebook_size=K, decay=s.decay, kmeans_init=s.init == "data", kmeans_iters=5,
                              commitment_weight=s.commitment)
    if s.replacement > 0:
        if new:
            kw["dead_code_threshold_ratio"] = s.replacement_ratio
        else:
            kw["threshold_ema_dead_code"] = s.replacement
    if kind == "lucid-cos":
        kw["use_cosine_sim"] = True
    if kind == "lucid-rvq":
        m = vqp.ResidualVQ(dim=D, num_quantizers=Q, **kw)
        layers = list(m.layers)

        def call(mod, z):
            q, idx, aux = mod(z)
            return q, idx.long(), aux.sum()
    else:
        m = vqp.VectorQuantize(dim=D, **kw)
        layers = [m]

        def call(mod, z):
            q, idx, aux = mod(z)
            return q, idx.long().unsqueeze(-1), aux.sum()

    def cbs():
        return [layer._codebook.embed[0].detach() for layer in layers]

    def set_rows(rows):
        cb = layers[0]._codebook
        with torch.no_grad():
            cb.embed[0].copy_(rows)
            if not new:
                cb.embed_avg[0].copy_(rows * cb.cluster_size[0].unsqueeze(-1))
    return Handle(m, K, Q, call, cbs, lambda: [], set_rows=set_rows, cosine=kind == "lucid-cos",
                  to_code_space=(lambda z: F.normalize(z, dim=-1)) if kind == "lucid-cos" else (lambda z: z),
                  info={"version": ver, "new_ema": new})


def _encodec(kind: str, spec: dict, s: Any) -> Handle:
    core_vq = encodec_core_vq()
    K, D, Q = spec["K"], spec["D"], spec["stages"]
    kw = dict(dim=D, codebook_size=K, decay=s.decay, kmeans_init=s.init == "data", kmeans_iters=10,
              threshold_ema_dead_code=s.replacement, commitment_weight=s.commitment)
    if kind == "encodec-rvq":
        m = core_vq.ResidualVectorQuantization(num_quantizers=Q, **kw)
        layers = list(m.layers)

        def call(mod, z):
            q, idx, aux = mod(z.transpose(1, 2))  # [B, D, T]; idx [Q, B, T]
            return q.transpose(1, 2), idx.permute(1, 2, 0).long(), aux.sum()
    else:
        m = core_vq.VectorQuantization(**kw)
        layers = [m]

        def call(mod, z):
            q, idx, aux = mod(z.transpose(1, 2))
            return q.transpose(1, 2), idx.long().unsqueeze(-1), aux.sum()

    def set_rows(rows):
        cb = layers[0]._codebook
        with torch.no_grad():
            cb.embed.copy_(rows)
            cb.embed_avg.copy_(rows)
            cb.cluster_size.fill_(1.0)  # counts of 1 for rows set by hand (zeros would blow them up)
            cb.inited.fill_(1.0)
    return Handle(m, K, Q, call, lambda: [layer._codebook.embed.detach() for layer in layers], lambda: [],
                  set_rows=set_rows)


def _dac(kind: str, spec: dict, s: Any) -> Handle:
    from transformers import DacConfig
    from transformers.models.dac import modeling_dac

    K, D, Q, cd = spec["K"], spec["D"], spec["stages"], spec["codebook_dim"]
    cfg = DacConfig(hidden_size=D, codebook_size=K, codebook_dim=cd, n_codebooks=Q, quantizer_dropout=0.0)
    commit_w = s.commitment
    if kind == "hf-dac-rvq":
        m = modeling_dac.DacResidualVectorQuantizer(cfg)
        layers = list(m.quantizers)

        def call(mod, z):
            q, codes, _lat, commit, cbl = mod(z.transpose(1, 2))  # codes [B, Q, T]
            return q.transpose(1, 2), codes.permute(0, 2, 1).long(), commit_w * commit.sum() + cbl.sum()
    else:
        m = modeling_dac.DacVectorQuantize(cfg)
        layers = [m]

        def call(mod, z):
            q, commit, cbl, codes, _lat = mod(z.transpose(1, 2))
            return q.transpose(1, 2), codes.long().unsqueeze(-1), commit_w * commit + cbl

    def to_code(z):
        with torch.no_grad():
            return layers[0].in_proj(z.t().unsqueeze(0)).squeeze(0).t()

    def set_rows(rows):
        with torch.no_grad():
            layers[0].codebook.weight.copy_(rows)
    return Handle(m, K, Q, call, lambda: [layer.codebook.weight.detach() for layer in layers],
                  lambda: [layer.codebook.weight for layer in layers], to_code_space=to_code, set_rows=set_rows,
                  cosine=True)


def _bchw(fn):
    """Call a `[B, C, H, W]` quantizer on `[B, T, D]` tokens (H = T, W = 1)."""
    def call(mod, z):
        zq, idx, aux = fn(mod, z.permute(0, 2, 1).unsqueeze(-1))
        return zq.squeeze(-1).permute(0, 2, 1), idx.reshape(z.shape[0], z.shape[1], 1).long(), aux
    return call


def _embedding_handle(m: nn.Module, weight: nn.Parameter, K: int, call) -> Handle:
    def set_rows(rows):
        with torch.no_grad():
            weight.copy_(rows)
    return Handle(m, K, 1, call, lambda: [weight.detach()], lambda: [weight], set_rows=set_rows)


def build(spec: dict, s: Any) -> Handle:
    """The quantizer of `spec` under the run settings `s` (see `train.settings`)."""
    from handwritten import Lookup, LookupEMA, RosinalityQuantize, TamingQuantizer, ZalandoEMA

    kind, K, D = spec["kind"], spec["K"], spec["D"]
    if kind.startswith("lucid"):
        return _lucid(kind, spec, s)
    if kind.startswith("encodec"):
        return _encodec(kind, spec, s)
    if kind.startswith("hf-dac"):
        return _dac(kind, spec, s)
    if kind == "diffusers-vq":
        from diffusers.models.autoencoders.vae import VectorQuantizer
        m = VectorQuantizer(K, D, beta=s.commitment, legacy=False)

        def f(mod, x):
            zq, loss, (_, _, idx) = mod(x)
            return zq, idx, loss
        return _embedding_handle(m, m.embedding.weight, K, _bchw(f))
    if kind == "taming-vq2":
        m = TamingQuantizer(K, D, beta=s.commitment, legacy=True, straight_through=s.straight_through)

        def f(mod, x):
            zq, loss, (_, _, idx) = mod(x)
            return zq, idx, loss
        return _embedding_handle(m, m.embedding.weight, K, _bchw(f))
    if kind == "custom-vq":
        m = Lookup(K, D, beta=s.commitment, straight_through=s.straight_through)

        def call(mod, z):
            out, codes, extra = mod(z)
            return out, codes.long().unsqueeze(-1), extra
        return _embedding_handle(m, m.table.weight, K, call)
    if kind == "zalando-ema":
        m = ZalandoEMA(K, D, s.commitment, s.decay, counts_init=s.counts_init, straight_through=s.straight_through)

        def f(mod, x):
            loss, zq, _ppl, idx = mod(x)
            return zq, idx, loss

        def set_rows(rows):
            with torch.no_grad():
                m._embedding.weight.copy_(rows)
                m._ema_w.copy_(rows * max(s.counts_init, 1.0) if s.counts_init > 0 else rows)
        return Handle(m, K, 1, _bchw(f), lambda: [m._embedding.weight.detach()], lambda: [], set_rows=set_rows)
    if kind == "rosinality-ema":
        m = RosinalityQuantize(D, K, decay=s.decay, counts_init=s.counts_init, straight_through=s.straight_through)

        def call(mod, z):
            q, diff, idx = mod(z)
            return q, idx.long().unsqueeze(-1), s.commitment * diff

        def set_rows(rows):
            with torch.no_grad():
                m.embed.copy_(rows.t())
                m.embed_avg.copy_(rows.t() * (s.counts_init if s.counts_init > 0 else 1.0))
        return Handle(m, K, 1, call, lambda: [m.embed.t().detach()], lambda: [], set_rows=set_rows)
    if kind == "custom-ema":
        m = LookupEMA(K, D, rate=s.decay, beta=s.commitment, counts_init=s.counts_init,
                      straight_through=s.straight_through)

        def call(mod, z):
            out, codes, extra = mod(z)
            return out, codes.long().unsqueeze(-1), extra

        def set_rows(rows):
            with torch.no_grad():
                m.table.copy_(rows)
                m.sums.copy_(rows * (s.counts_init if s.counts_init > 0 else 1.0))
        return Handle(m, K, 1, call, lambda: [m.table.detach()], lambda: [], set_rows=set_rows)
    raise ValueError(f"unknown kind {kind}")
