"""Find quantizers in a checkpoint and turn them into the normal form (`QuantizerState`).

Adapters are tried from the most specific layout to the generic fallback; a key claimed by one
adapter is never reused by another. Each adapter lives in its own module and exposes `ADAPTER`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.errors import CheckpointError, NoQuantizerError
from vqdoctor.quantizers._common import INCONSISTENT
from vqdoctor.quantizers.base import KINDS, Adapter, QuantizerState

# Order matters: specific layouts first, the generic fallback last.
ADAPTER_MODULES = (
    "lucidrains",      # vector-quantize-pytorch: VectorQuantize, ResidualVQ, GroupedResidualVQ, LFQ, SimVQ
    "encodec",         # encodec / audiocraft core_vq, transformers EnCodec
    "mimi",            # transformers Mimi
    "dac",             # descript-audio-codec and transformers DAC
    "taming",          # taming VectorQuantizer2, GumbelQuantize, EMAVectorQuantizer; diffusers VQModel
    "rosinality",      # VQ-VAE-2 Quantize (embed stored [dim, n_embed])
    "zalando",         # zalando VectorQuantizerEMA
    "sonnet",          # Sonnet-style EMA modules
    "generic",         # a [K, D] table plus EMA-like buffers
)

# Shown when nothing is found, so the user knows what was tried (kept short: it ends a one-line error).
SEARCHED = (
    "vector-quantize-pytorch (VQ, RVQ, FSQ, LFQ, SimVQ), encodec/audiocraft core_vq, transformers "
    "EnCodec/Mimi/DAC, moshi Mimi, descript-audio-codec, diffusers VQModel, taming-transformers, rosinality VQ-VAE-2, "
    "zalando VQ-VAE, Sonnet/torchmultimodal/VideoGPT EMA, generic [K, D] codebook with EMA buffers"
)
NAME_HINT = "name one with --quantizer PREFIX (e.g. --quantizer model.quantize; add --levels for FSQ)"


def adapters() -> list[Adapter]:
    """The adapters, in the order they are tried (modules not present are skipped)."""
    out = []
    for name in ADAPTER_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        out.append(mod.ADAPTER)
    return out


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def discover(src: TensorSource, *, only: Sequence[str] | None = None,
             levels: Sequence[int] | None = None) -> list[QuantizerState]:
    """Every quantizer in `src`, in file order.

    Args:
        src: the opened checkpoint.
        only: key prefixes naming the quantizers wanted (`--quantizer`). A prefix that no adapter
            recognises is read as an explicit quantizer by the generic adapter.
        levels: FSQ levels, for FSQ quantizers named in `only` (nothing of them is stored).

    Raises:
        NoQuantizerError: nothing found, or a named prefix holds no quantizer; the message says
            what was searched and how to name one.
        CheckpointError: a selected quantizer's EMA statistics do not fit its codebook (e.g.
            counts of length K + 1); the message names the tensors and their shapes.
    """
    claimed: set[str] = set()
    states: list[QuantizerState] = []
    for ad in adapters():
        found = ad.find(src, claimed)
        for s in found:
            claimed.update(s.keys.values())
        # Tensors of a quantizer found inconsistent are nobody's: no later adapter may guess at them.
        for _, keys in src.meta.get(INCONSISTENT, {}).values():
            claimed.update(keys)
        states.extend(found)

    for prefix, (message, _) in src.meta.get(INCONSISTENT, {}).items():
        if not only or _matches(prefix, only):
            raise CheckpointError(
                message, path=src.path,
                hint="the file contradicts itself (tensors edited, or taken from different checkpoints)"
                     + ("; inspect the other quantizers by naming them with --quantizer PREFIX"
                        if states else ""))

    if only:
        from vqdoctor.quantizers import generic

        # a named prefix is read explicitly (its siblings by shape), unless a library adapter
        # recognised it; the generic adapter's reading of it is the fallback
        picked = [s for s in states if _matches(s.name, only) and s.library != "generic"]
        for p in only:
            if not any(_matches(s.name, [p]) for s in picked):
                named = generic.explicit(src, p.rstrip("."), levels=levels)
                picked.extend(named or [s for s in states if _matches(s.name, [p]) and s.library == "generic"])
        states = picked
    elif levels:
        for s in states:
            if s.kind == "fsq" and s.levels is None:
                s.levels = tuple(int(x) for x in levels)
        if not any(s.kind == "fsq" for s in states):
            # the user says there is an FSQ: find it by its layout (it stores no levels)
            from vqdoctor.quantizers.lucidrains import fsq_from_levels

            states.extend(fsq_from_levels(src, claimed, [int(x) for x in levels]))

    if not states:
        n = len(src.keys())
        raise NoQuantizerError(
            f"no quantizer found among {n} tensor{'s' * (n != 1)}",
            path=src.path, hint=f"{NAME_HINT}; searched for: {SEARCHED}")

    order = {k: i for i, k in enumerate(src.infos)}
    states.sort(key=lambda s: min((order.get(k, 1 << 60) for k in s.keys.values()), default=1 << 60))
    attach_optimizer(src, states)
    return states


def attach_optimizer(src: TensorSource, states: list[QuantizerState]) -> None:
    """Match optimizer moments (Adam `exp_avg`/`exp_avg_sq`) to codebooks by shape, when unique.

    Optimizer state is indexed by parameter position, not name, so the match is by shape: a
    moment whose shape equals the stored codebook shape, and no other candidate of that shape.
    """
    entries = src.meta.get("optimizer") or []
    if not entries:
        return
    for s in states:
        if s.kind not in ("vq", "gumbel", "simvq") or "codebook" not in s.keys:
            continue
        shape = src.infos[s.keys["codebook"]].shape
        same = [e for e in entries if tuple(e.get("shape", ())) == tuple(shape)]
        if len(same) != 1:
            continue
        moments = {}
        for name, key in same[0]["keys"].items():
            t = src.get_float(key)
            if s.codebook is not None and t.numel() == s.codebook.numel():
                moments[name] = t.reshape(s.codebook.shape)
        if moments:
            s.optimizer = moments


__all__ = ["KINDS", "SEARCHED", "Adapter", "QuantizerState", "adapters", "discover"]
