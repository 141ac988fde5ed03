"""Quantizers found by their class or by what they do, not by what they are called.

The state-dict adapters (`discovery`) know the layouts of the supported libraries and a generic
table-plus-EMA-buffers form, and they go by key names. A user's own quantizer (`self.block2`, a
`table` Parameter, a module that is its own root because the loop calls `encoder(x)`,
`quantizer(z)`, `decoder(zq)` one after the other) has no telling names. Behaviour decides
for such modules:

- a *candidate* is a module that is not one of torch's own layers and owns a float table
  `[K, D]` (K >= 2): a Parameter or buffer of its own, or the weight of an `nn.Embedding` child;
- it *is* a quantizer when one of its forwards returns an integer tensor whose values index
  that table (all in [0, K), -1 allowed as "masked"), read once, at its first forward
  (`confirms`: one host read, before any statistic is taken).

`table_quantizer` turns such a module (or any module a user names) into a `LiveQuantizer`.

By class: some supported quantizers are read by the layout adapters only under the attribute
name a full model gives them (`quantize.embedding.weight`, `quantizer.layers.0.codebook.embed`);
as a root module, or under another name, their keys say nothing. `by_class` reads such a module's
own state dict under its usual name (`CLASS_PREFIX`), so its library and layout are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vqdoctor.checkpoint.base import TensorInfo, TensorSource
from vqdoctor.errors import NoQuantizerError
from vqdoctor.live.discovery import LiveQuantizer, LiveSpec, ModuleIndex, _from_spec
from vqdoctor.live.outputs import find_tensor, is_index
from vqdoctor.quantizers.base import QuantizerState

# class name -> the attribute name under which the layout adapters know its state dict
CLASS_PREFIX = {
    "VectorQuantizer2": "quantize",            # taming-transformers (VQGAN)
    "VectorQuantizer": "quantize",             # diffusers VQModel, taming (legacy)
    "EMAVectorQuantizer": "quantize",          # taming-transformers
    "EncodecResidualVectorQuantizer": "quantizer",   # transformers EncodecModel
    "DacResidualVectorQuantize": "quantizer",        # transformers DacModel
    "MimiSplitResidualVectorQuantizer": "quantizer",  # transformers MimiModel
    "ResidualVectorQuantization": "quantizer.vq",     # encodec / audiocraft core_vq
}


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def by_class(index: ModuleIndex, taken: list[str]) -> list[QuantizerState]:
    """States of known quantizer classes the layout pass missed, named by their place in the model.

    Each such module's own state dict is read as if it sat under its usual attribute name; the
    states found are renamed to the module's path (keys too), so the live readers find their tensors.
    """
    from vqdoctor.quantizers import discover

    out: list[QuantizerState] = []
    for clean, m in index.clean_to_module.items():
        inner = index.innermost(clean) or m
        pre = CLASS_PREFIX.get(type(inner).__name__)
        if pre is None or any(clean == t or clean.startswith(t + ".") or t == ""
                              or t.startswith(_join(clean, "")) for t in taken + [q.name for q in out]):
            continue
        tensors = {_join(pre, k): v for k, v in inner.state_dict(keep_vars=True).items()
                   if isinstance(v, torch.Tensor)}
        if not tensors:
            continue
        infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}

        def load(key: str, tensors: dict[str, torch.Tensor] = tensors) -> torch.Tensor:
            with torch.no_grad():
                return tensors[key].detach().to("cpu", copy=True)

        try:
            states = discover(TensorSource(path="<live module>", format="live", safe_load=True,
                                           infos=infos, loader=load))
        except NoQuantizerError:
            continue

        def rename(key: str | None, pre: str = pre, clean: str = clean) -> str | None:
            if key is None:
                return None
            rest = key[len(pre):].lstrip(".") if key == pre or key.startswith(pre + ".") else key
            return _join(clean, rest)

        for st in states:
            st.name = rename(st.name) or ""
            st.group = rename(st.group)
            st.keys = {role: rename(k) or k for role, k in st.keys.items()}
            out.append(st)
    return out


def _tables(module: nn.Module) -> list[tuple[str, Callable[[], torch.Tensor | None], torch.Tensor]]:
    """The module's own [K, D] float tables: (description, live reader, tensor now)."""
    out = []
    for store in ("_parameters", "_buffers"):
        for name, t in getattr(module, store).items():
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point() and t.shape[0] >= 2:
                out.append((name, (lambda m=module, s=store, n=name: getattr(m, s).get(n)), t))
    for cname, child in module.named_children():
        if isinstance(child, nn.Embedding) and child.weight.shape[0] >= 2:
            out.append((f"{cname}.weight", (lambda c=child: c.weight), child.weight))
    return out


def _counts(module: nn.Module, K: int) -> Callable[[], torch.Tensor | None] | None:
    """A [K] float buffer of the module (EMA counts), when it has exactly one."""
    hits = [n for n, b in module._buffers.items()
            if isinstance(b, torch.Tensor) and b.is_floating_point() and tuple(b.shape) == (K,)]
    if len(hits) != 1:
        return None
    name = hits[0]
    return lambda: module._buffers.get(name)


def is_candidate(module: nn.Module) -> bool:
    """A module that could be a quantizer: not a torch layer, and owning a [K, D] table."""
    if type(module).__module__.startswith("torch."):
        return False
    return bool(_tables(module))


def candidates(index: ModuleIndex, taken: list[str]) -> list[tuple[str, nn.Module]]:
    """Candidate modules of a model (clean name, outermost module) outside the quantizers found."""
    out = []
    for clean, m in index.clean_to_module.items():
        inner = index.innermost(clean) or m
        if any(clean == t or clean.startswith(t + ".") or t == "" for t in taken):
            continue
        if is_candidate(inner):
            out.append((clean, m))
    return out


def confirms(module: nn.Module, output: Any) -> bool:
    """True when the forward's output holds integer indices into one of the module's tables.

    Reads the index tensor's range on the host once (this runs at a candidate's first forward,
    before the watch records anything).
    """
    sizes = [int(t.shape[0]) for _, _, t in _tables(module)]
    hit = find_tensor(output, is_index)
    if hit is None or not sizes:
        return False
    idx = hit[0].detach()
    lo, hi = int(idx.min()), int(idx.max())
    return lo >= -1 and hi >= 0 and any(hi < k for k in sizes)


def table_quantizer(name: str, module: nn.Module, inner: nn.Module | None = None) -> LiveQuantizer | None:
    """A `LiveQuantizer` over a module's own codebook table (the largest one), None without one.

    The kind: "vq-ema" when the table is not trained by gradient and a [K] count buffer sits
    beside it; "vq" otherwise (a Parameter, or a buffer nothing updates that the rules will see).
    """
    inner = inner or module
    tables = _tables(inner)
    if not tables:
        return None
    desc, read, t = max(tables, key=lambda x: x[2].numel())
    K, D = int(t.shape[0]), int(t.shape[1])
    learned = isinstance(t, nn.Parameter) and t.requires_grad
    counts = None if learned else _counts(inner, K)
    top = type(inner).__module__.split(".")[0]
    spec = LiveSpec(kind="vq" if learned or counts is None else "vq-ema", codebook_size=K, dim=D,
                    codebook=read, counts=counts,
                    library="generic" if top in ("__main__", "") else top.replace("_", "-"))
    lq = _from_spec(name, module, spec)
    lq.notes.append(f"read from its own table {desc} [{K}, {D}] (no known layout)")
    return lq


__all__ = ["CLASS_PREFIX", "by_class", "candidates", "confirms", "is_candidate", "table_quantizer"]
