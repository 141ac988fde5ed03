"""Reading a quantizer's forward: where its code indices, input and quantized output are.

Libraries return tuples, dicts, dataclasses or `ModelOutput`s in their own orders. An
`OutputReader` finds, once per quantizer, the path to the code indices (the first integer tensor
of the output, or the argmax of a float `[..., K]` assignment tensor), to the input vectors and to
the quantized output (a float tensor of the input's shape), and replays those paths on later
forwards; it also decides the input layout (channels-first or -last) once. Nothing here reads a
tensor value on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Input vectors used for cadence statistics: the first rows, in memory order (deterministic).
SAMPLE_ROWS = 4096
# projections that are safe to apply again on the side (no RNG, no state): evaluated functionally
_SAFE_PROJ = (nn.Linear, nn.LayerNorm, nn.Identity, nn.Sequential)
# nesting depth searched in an output
_MAX_DEPTH = 6


def dynamo_disable(fn: Callable) -> Callable:
    """`torch._dynamo.disable(fn)`: a compiled model graph-breaks around the hook and runs it
    eagerly, also when the model is compiled after the watch started. Importing dynamo costs a
    second or two once per process (nothing when vector-quantize-pytorch or diffusers already
    imported it), which a training run can afford."""
    try:
        import torch._dynamo

        return torch._dynamo.disable(fn)
    except Exception:  # pragma: no cover - a torch build without dynamo
        return fn


def is_compiling() -> bool:
    """True while dynamo traces (a hook that is traced anyway must then do nothing)."""
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover
        return False


def find_tensor(obj: Any, want: Callable[[torch.Tensor], bool], depth: int = 0,
                path: tuple = ()) -> tuple[torch.Tensor, tuple] | None:
    """First tensor in a nested output (tuple, list, dict, dataclass, ModelOutput) satisfying `want`.

    Returns (tensor, path) where path replays the lookup with `follow`.
    """
    if depth > _MAX_DEPTH:
        return None
    if isinstance(obj, torch.Tensor):
        return (obj, path) if want(obj) else None
    if isinstance(obj, (tuple, list)):
        items: Iterable = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif hasattr(obj, "__dataclass_fields__"):
        items = ((f, getattr(obj, f, None)) for f in obj.__dataclass_fields__)
    else:
        return None
    for k, v in items:
        hit = find_tensor(v, want, depth + 1, (*path, k))
        if hit is not None:
            return hit
    return None


def follow(obj: Any, path: tuple) -> Any:
    """Replay a `find_tensor` path; None when it no longer fits."""
    for k in path:
        try:
            obj = obj[k] if isinstance(obj, (tuple, list, dict)) else getattr(obj, k)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return obj


def is_index(t: torch.Tensor) -> bool:
    """An integer tensor that can hold code indices."""
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool and t.numel() > 0


def functional_projection(proj: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A side-effect-free re-evaluation of a `project_in` made of Linear / LayerNorm / Identity.

    Calling the module itself would fire the user's hooks on it; anything else (dropout, custom
    code) might consume RNG or hold state, so such projections are not re-evaluated at all.
    """
    if proj is None:
        return None
    mods: list[nn.Module] = []
    stack = [proj]
    while stack:
        m = stack.pop(0)
        if isinstance(m, nn.Sequential):
            stack = list(m) + stack
            continue
        if not isinstance(m, _SAFE_PROJ):
            return None
        mods.append(m)

    def run(x: torch.Tensor) -> torch.Tensor:
        for m in mods:
            if isinstance(m, nn.Linear):
                x = torch.nn.functional.linear(x, m.weight, m.bias)
            elif isinstance(m, nn.LayerNorm):
                x = torch.nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        return x

    return run


class OutputReader:
    """Finds and replays where one quantizer's indices, input and quantized output are.

    Args:
        codebook_size: K.
        heads: H when the index tensor carries H separate codebooks on its last axis, else 1.
        input_dim: dimension of the module's input vectors (0: unknown).
        channel_first: the library's input layout convention (None: unknown).
        indices: a custom index reader (an adapter's), replacing the search.
        quantized: a custom quantized-output reader, replacing the search.
    """

    def __init__(self, codebook_size: int, heads: int = 1, input_dim: int = 0,
                 channel_first: bool | None = None,
                 indices: Callable[[Any], torch.Tensor | None] | None = None,
                 quantized: Callable[[Any], torch.Tensor | None] | None = None):
        self.K = int(codebook_size)
        self.H = max(1, int(heads))
        self.input_dim = int(input_dim or 0)
        self.default_cf = channel_first
        self.custom_indices = indices
        self.custom_quantized = quantized
        self.idx_path: tuple | None = None
        self.idx_onehot = False
        self.q_path: tuple | None = None
        self.in_path: tuple | None = None
        self.cf: bool | None = None
        self.layout_known = False

    def indices(self, output: Any, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor | None:
        """The code indices of one forward (integer tensor), or None when the reader gives none.

        Raises:
            RuntimeError: the output holds neither integer indices nor a float assignment tensor.
        """
        if self.custom_indices is not None:
            return self.custom_indices(output)
        idx = follow(output, self.idx_path) if self.idx_path is not None else None
        if self.idx_onehot:
            idx = idx.argmax(-1) if isinstance(idx, torch.Tensor) and self.is_assignment(idx, None) else None
        if isinstance(idx, torch.Tensor) and is_index(idx):
            return idx
        hit = find_tensor(output, is_index)
        self.idx_onehot = False
        if hit is None:
            x = self.input(args, kwargs or {})
            hit = find_tensor(output, lambda t: self.is_assignment(t, x))
            self.idx_onehot = hit is not None
        if hit is None:
            raise RuntimeError("no integer code indices found in the quantizer's output "
                               "(register an adapter with an `indices` reader)")
        idx, self.idx_path = hit
        return idx.argmax(-1) if self.idx_onehot else idx

    def is_assignment(self, t: torch.Tensor, x: torch.Tensor | None) -> bool:
        """A float `[..., K]` tensor that can only be per-vector code assignments (one head)."""
        return (self.H == 1 and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == self.K
                and self.K > 1 and (x is None or t.shape != x.shape))

    def input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The forward's input vectors: the first float tensor of >= 2 dims among its arguments."""
        src = (args, kwargs)
        if self.in_path is not None:
            x = follow(src, self.in_path)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return x
        hit = find_tensor(src, lambda t: t.is_floating_point() and t.dim() >= 2)
        if hit is None:
            return None
        self.in_path = hit[1]
        return hit[0]

    def quantized(self, output: Any, x: torch.Tensor | None) -> torch.Tensor | None:
        """The quantized output: a float tensor of the input's shape."""
        if self.custom_quantized is not None:
            return self.custom_quantized(output)
        if x is None:
            return None
        if self.q_path is not None:
            t = follow(output, self.q_path)
            if isinstance(t, torch.Tensor) and t.shape == x.shape and t.is_floating_point():
                return t
        hit = find_tensor(output, lambda t: t.is_floating_point() and t.shape == x.shape)
        if hit is None:
            return None
        self.q_path = hit[1]
        return hit[0]

    def settle_layout(self, x: torch.Tensor, output: Any) -> None:
        """Decide the layout from x and the shape of the index tensor found earlier (once)."""
        if self.layout_known:
            return
        idx = follow(output, self.idx_path) if self.idx_path is not None else None
        if self.idx_onehot and isinstance(idx, torch.Tensor) and idx.dim():
            idx = idx[..., 0]  # only the shape is read: the vectors' axes, without the K axis
        self.layout(x, idx if isinstance(idx, torch.Tensor) else None)

    def layout(self, x: torch.Tensor, idx: torch.Tensor | None) -> bool | None:
        """True when x is channels-first ([B, D, ...]), False when channels-last, None when unknown.

        Decided once per quantizer: from the index tensor's shape (it is x's shape without the
        vector axis) when that settles it, else from which axis has the input dimension, else
        from the library's convention.
        """
        if self.layout_known:
            return self.cf
        d = self.input_dim or x.shape[-1]
        cf: bool | None = None
        if idx is not None and x.dim() >= 3:
            shape = tuple(idx.shape[:-1]) if self.H > 1 and idx.dim() and idx.shape[-1] == self.H else tuple(idx.shape)
            last, first = tuple(x.shape[:-1]), (x.shape[0], *x.shape[2:])
            if shape == last and shape != first and x.shape[-1] == d:
                cf = False
            elif shape == first and shape != last and x.shape[1] == d:
                cf = True
        if cf is None:
            on_last, on_first = x.shape[-1] == d, x.dim() >= 3 and x.shape[1] == d
            if on_last != on_first:
                cf = on_first
            elif on_last:
                cf = bool(self.default_cf)
        self.cf, self.layout_known = cf, True
        return cf

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The first SAMPLE_ROWS input vectors as [n, input_dim] (a view or a small copy)."""
        d = self.input_dim or x.shape[-1]
        if x.dim() < 2 or self.cf is None:
            return None
        axis = 1 if self.cf else x.dim() - 1
        if x.shape[axis] != d:
            return None
        per_b = max(1, x[0].numel() // d)
        b = min(x.shape[0], -(-SAMPLE_ROWS // per_b))
        xb = x[:b].movedim(1, -1) if self.cf else x[:b]
        return xb.reshape(-1, d)[:SAMPLE_ROWS]
