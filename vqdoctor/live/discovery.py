"""Live discovery: the quantizer submodules of a model, and how to read each one while it trains.

Three sources, most specific first:

1. Adapters registered with `register_adapter(cls_or_predicate, fn)` for custom modules.
2. The checkpoint adapters (`vqdoctor.quantizers.discover`) run over a `TensorSource` built from
   `model.state_dict(keep_vars=True)`: names are module paths, so each found quantizer maps back
   to its module with `get_submodule`; its codebook / EMA counts are read live from the owning
   module's attribute (no copy), so they follow re-registered buffers.
3. Class-based detection of quantizers that store no codebook (vector-quantize-pytorch `FSQ`,
   `ResidualFSQ` stages, `LFQ`), by class name and attributes (`_levels`, `codebook_size`).

Wrapper modules are transparent: DDP / DataParallel `module.`, `torch.compile` `_orig_mod.`,
FSDP `_fsdp_wrapped_module.` and activation-checkpoint `_checkpoint_wrapped_module.` segments
are removed from names; the hook goes on the outermost module of a wrapped quantizer (for a
compiled quantizer that is the `OptimizedModule`, whose hooks run outside the compiled graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vqdoctor.checkpoint.base import TensorInfo, TensorSource
from vqdoctor.errors import NoQuantizerError
from vqdoctor.quantizers.base import QuantizerState

# wrapper class name -> the attribute holding the wrapped module
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
}
# Libraries whose quantizers take channels-first inputs ([B, D, ...]); the rest take [..., D].
CHANNEL_FIRST_LIBS = {"encodec", "diffusers", "taming-transformers", "taming-style", "zalando",
                      "descript-audio-codec", "transformers"}

Predicate = Callable[[nn.Module], bool]


@dataclass
class LiveSpec:
    """What a custom adapter tells the watch about one quantizer module.

    Returned by the `fn` given to `register_adapter`. Only `kind` and `codebook_size` are
    required; every reader left as None falls back to the defaults (indices: the first integer
    tensor in the module's output; quantized vectors: the first floating tensor of the output
    with the input's shape).

    Attributes:
        kind: one of `vqdoctor.quantizers.KINDS` ("vq-ema", "vq", "gumbel", "simvq", "fsq", "lfq").
        codebook_size: K.
        dim: code dimension D (taken from the codebook when omitted).
        codebook: returns the live codebook tensor ([K, D] or [H, K, D]), no copy; None for none.
        counts: returns the live EMA counts tensor ([K] or [H, K]), or None.
        indices: output -> integer code indices (may raise: the probe is then disabled).
        quantized: output -> the quantized vectors (same shape as the input).
        heads: H, separate codebooks whose indices sit on the last axis of the index tensor.
        library: shown in reports.
        levels: FSQ levels.
        channel_first: True when inputs are [B, D, ...]; None to guess.
    """

    kind: str
    codebook_size: int
    dim: int | None = None
    codebook: Callable[[], torch.Tensor | None] | None = None
    counts: Callable[[], torch.Tensor | None] | None = None
    indices: Callable[[Any], torch.Tensor | None] | None = None
    quantized: Callable[[Any], torch.Tensor | None] | None = None
    heads: int = 1
    library: str = "custom"
    levels: tuple[int, ...] | None = None
    channel_first: bool | None = None


_ADAPTERS: list[tuple[type | Predicate, Callable[[nn.Module], Any]]] = []


def register_adapter(cls_or_predicate: type | Predicate, fn: Callable[[nn.Module], Any]) -> Callable[[], None]:
    """Teach the watch a custom quantizer module.

    Args:
        cls_or_predicate: a module class (matched with isinstance) or a function
            `module -> bool`.
        fn: `module -> LiveSpec` (or a dict of LiveSpec fields, or None when the module turns
            out not to be a quantizer).

    Returns:
        A function that removes the registration.

    Example:
        vqdoctor.register_adapter(MyVQ, lambda m: vqdoctor.LiveSpec(
            kind="vq", codebook_size=m.K, codebook=lambda: m.table.weight))
    """
    entry = (cls_or_predicate, fn)
    _ADAPTERS.append(entry)

    def remove() -> None:
        if entry in _ADAPTERS:
            _ADAPTERS.remove(entry)

    return remove


def _registered(module: nn.Module) -> LiveSpec | None:
    for match, fn in reversed(_ADAPTERS):  # the latest registration wins
        hit = isinstance(module, match) if isinstance(match, type) else bool(match(module))
        if not hit:
            continue
        spec = fn(module)
        if spec is None:
            continue
        if isinstance(spec, dict):
            spec = LiveSpec(**spec)
        if not isinstance(spec, LiveSpec):
            raise TypeError(f"adapter for {type(module).__name__} returned {type(spec).__name__}, "
                            f"expected LiveSpec, dict or None")
        return spec
    return None


@dataclass
class LiveQuantizer:
    """One quantizer of a live model, with the readers the hooks need.

    Attributes:
        name: module path with wrapper segments removed ("" when the model is the quantizer).
        module: the module the hooks go on.
        state: identity in normal form (tensors are start-of-run CPU copies; not read live).
        codebook: returns the live codebook as [H, K, D] (a view, no copy), or None.
        counts: returns the live EMA counts as [H, K] (a view), or None.
        codebook_param: the codebook when it is an nn.Parameter (for gradient norms).
        index_heads: H when the index tensor carries H separate codebooks on its last axis, else 1.
        indices: custom index reader (None: first integer tensor of the output).
        quantized: custom quantized-vector reader (None: output tensor with the input's shape).
        channel_first: input layout: True [B, D, ...], False [..., D], None unknown.
        code_dim: D, the dimension codes live in.
        input_dim: dimension of the module's input vectors (D x heads, or before project_in).
        replaces: the quantizer replaces dead codes (a `threshold_ema_dead_code` > 0 somewhere in
            it), so rows that jump between cadence snapshots are counted as replaced.
        project_in: the module's own input projection (e.g. vector-quantize-pytorch
            `project_in`), re-evaluated functionally on a sample of inputs to reach code space;
            None when inputs already are in code space.
    """

    name: str
    module: nn.Module
    state: QuantizerState
    codebook: Callable[[], torch.Tensor | None]
    counts: Callable[[], torch.Tensor | None]
    codebook_param: nn.Parameter | None = None
    index_heads: int = 1
    indices: Callable[[Any], torch.Tensor | None] | None = None
    quantized: Callable[[Any], torch.Tensor | None] | None = None
    channel_first: bool | None = None
    code_dim: int = 0
    input_dim: int = 0
    project_in: nn.Module | None = None
    replaces: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def codebook_size(self) -> int:
        """K."""
        return int(self.state.codebook_size)

    def describe(self) -> dict[str, Any]:
        """JSON-native identity (the normal form's `describe()`, heads as counted live)."""
        d = self.state.describe()
        d["heads"] = max(int(d.get("heads", 1)), self.index_heads)
        return d


# ------------------------------------------------------------------------------ module paths


def _wrapped_attr(m: nn.Module) -> str | None:
    attr = _WRAPPERS.get(type(m).__name__)
    return attr if attr is not None and isinstance(getattr(m, attr, None), nn.Module) else None


class ModuleIndex:
    """Clean names (wrapper segments removed) <-> modules and raw paths of a model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.raw_to_clean: dict[str, str] = {}
        self.clean_to_module: dict[str, nn.Module] = {}
        self.clean_to_raw: dict[str, str] = {}
        self.order: dict[int, int] = {}  # id(module) -> registration position
        self._walk(model, "", "")

    def _walk(self, m: nn.Module, raw: str, clean: str) -> None:
        self.raw_to_clean[raw] = clean
        if clean not in self.clean_to_module:  # outermost module of a wrapped chain wins
            self.clean_to_module[clean] = m
            self.clean_to_raw[clean] = raw
        self.order.setdefault(id(m), len(self.order))
        wrapped = _wrapped_attr(m)
        for name, child in m._modules.items():
            if child is None:
                continue
            child_raw = f"{raw}.{name}" if raw else name
            child_clean = clean if name == wrapped else (f"{clean}.{name}" if clean else name)
            self._walk(child, child_raw, child_clean)

    def clean_key(self, raw_key: str) -> str:
        """Clean a state-dict key: its module part through the walk, the attribute kept."""
        mod, _, attr = raw_key.rpartition(".")
        clean = self.raw_to_clean.get(mod)
        if clean is None:  # a key from a custom state_dict hook: strip wrapper segments by name
            parts = [p for p in mod.split(".") if p and p not in ("_orig_mod", "_fsdp_wrapped_module",
                                                                  "_checkpoint_wrapped_module")]
            clean = ".".join(parts)
        return f"{clean}.{attr}" if clean else attr

    def innermost(self, clean: str) -> nn.Module | None:
        """The real (unwrapped) module at a clean path."""
        m = self.clean_to_module.get(clean)
        while m is not None and (attr := _wrapped_attr(m)) is not None:
            m = getattr(m, attr)
        return m


def _attr_reader(owner: nn.Module, attr: str) -> Callable[[], torch.Tensor | None]:
    """Reads `owner.attr` at every call, so a re-registered buffer is followed."""

    def read() -> torch.Tensor | None:
        t = getattr(owner, attr, None)
        return t if isinstance(t, torch.Tensor) else None

    return read


def _as_hkd_reader(read: Callable[[], torch.Tensor | None], shape: tuple[int, int, int]
                   ) -> Callable[[], torch.Tensor | None] | None:
    """Wrap a raw tensor reader so it returns an [H, K, D] view matching the normal form."""
    H, K, D = shape
    t = read()
    if t is None:
        return None
    if tuple(t.shape) == (H, K, D):
        return read
    if t.dim() == 2 and tuple(t.shape) == (K, D) and H == 1:
        return lambda: (x.unsqueeze(0) if (x := read()) is not None else None)
    if t.dim() == 2 and tuple(t.shape) == (D, K) and H == 1:  # stored transposed (rosinality)
        return lambda: (x.t().unsqueeze(0) if (x := read()) is not None else None)
    if t.numel() == H * K * D and t.is_contiguous():
        return lambda: (x.view(H, K, D) if (x := read()) is not None else None)
    return None


def _as_hk_reader(read: Callable[[], torch.Tensor | None], H: int, K: int) -> Callable[[], torch.Tensor | None] | None:
    t = read()
    if t is None or t.numel() != H * K:
        return None
    if tuple(t.shape) == (H, K):
        return read
    return lambda: (x.reshape(H, K) if (x := read()) is not None else None)


def _none() -> None:
    return None


def _source(model: nn.Module, index: ModuleIndex) -> tuple[TensorSource, dict[str, str]]:
    """A TensorSource over the live state dict (clean keys), and clean key -> raw key.

    The loader hands adapters detached CPU copies, so nothing an adapter does can touch the
    training tensors (and the copies are made once, at start).
    """
    raw_sd = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    raw_of: dict[str, str] = {}
    for raw, t in raw_sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        key = index.clean_key(raw)
        if key in tensors:
            continue
        tensors[key] = t
        raw_of[key] = raw
    infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def load(key: str) -> torch.Tensor:
        with torch.no_grad():
            return tensors[key].detach().to("cpu", copy=True)

    src = TensorSource(path="<live model>", format="live", safe_load=True, infos=infos, loader=load)
    return src, raw_of


def _module_for(index: ModuleIndex, state: QuantizerState, raw_of: dict[str, str]) -> tuple[str, nn.Module] | None:
    """(clean name, module to hook) of a discovered state.

    A table held by a torch layer (`nn.Embedding`) whose forward the quantizer never calls (it
    reads `.weight` for a `cdist` lookup) is watched at the module that holds the layer: that
    module's forward is the quantizer's.
    """
    if state.name in index.clean_to_module:
        m = index.clean_to_module[state.name]
        up = state.name.rpartition(".")[0]
        inner = index.innermost(state.name) or m
        if (up and up in index.clean_to_module and type(inner).__module__.startswith("torch.nn")
                and not type(index.innermost(up) or index.clean_to_module[up]).__module__.startswith("torch.")):
            return up, index.clean_to_module[up]
        return state.name, m
    # the state name is not a module path: walk up from its codebook's owner
    key = state.keys.get("codebook") or next(iter(state.keys.values()), None)
    if key is None:
        return None
    parts = key.split(".")[:-1]
    while parts:
        name = ".".join(parts)
        if name in index.clean_to_module:
            return name, index.clean_to_module[name]
        parts.pop()
    return None


def _owner_attr(index: ModuleIndex, clean_key: str) -> tuple[nn.Module, str] | None:
    mod, _, attr = clean_key.rpartition(".")
    m = index.innermost(mod)
    if m is None:
        return None
    if attr not in m._parameters and attr not in m._buffers and not hasattr(m, attr):
        return None
    return m, attr


def _channel_first(module: nn.Module, library: str) -> bool | None:
    inner = module
    while (attr := _wrapped_attr(inner)) is not None:
        inner = getattr(inner, attr)
    if library == "vector-quantize-pytorch":
        if getattr(inner, "accept_image_fmap", False) or getattr(inner, "accept_3d_fmap", False):
            return True
        if getattr(inner, "channel_first", None) is not None:
            return bool(inner.channel_first)
        if getattr(inner, "channel_last", None) is not None:
            return not bool(inner.channel_last)
        return False
    if library in CHANNEL_FIRST_LIBS:
        return True
    return None


def _projection(module: nn.Module) -> nn.Module | None:
    """The module's own `project_in` (vector-quantize-pytorch, encodec), when it is not Identity."""
    inner = module
    while (attr := _wrapped_attr(inner)) is not None:
        inner = getattr(inner, attr)
    proj = getattr(inner, "project_in", None)
    if isinstance(proj, nn.Module) and not isinstance(proj, nn.Identity):
        return proj
    return None


def _replaces(module: nn.Module) -> bool:
    """True when the quantizer has a dead-code replacement mechanism switched on
    (vector-quantize-pytorch <= 1.32 `threshold_ema_dead_code`, >= 1.34 `dead_code_threshold_ratio`)."""
    for m in module.modules():
        for attr in ("threshold_ema_dead_code", "dead_code_threshold_ratio"):
            t = getattr(m, attr, None)
            if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
                return True
    return False


def lucidrains_version() -> tuple[int, ...] | None:
    """The installed vector-quantize-pytorch release, or None when it cannot be read."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version("vector-quantize-pytorch").split(".")[:3] if p.isdigit())
    except (PackageNotFoundError, ValueError):
        return None


# The facts of a live vector-quantize-pytorch codebook that a state dict cannot show.
_LUCIDRAINS_ATTRS = ("threshold_ema_dead_code", "reset_cluster_size", "dead_code_threshold_ratio",
                     "reset_cluster_size_ratio")


def _lucidrains_live(state: QuantizerState, inner: nn.Module | None) -> None:
    """Kind, EMA arithmetic and replacement settings from the live module and the installed release.

    A state dict read at the start of a run cannot tell an EMA codebook from a gradient-trained
    one (vector-quantize-pytorch >= 1.34 starts both statistics at zero either way), nor which
    arithmetic the release uses; the module and the installed version can.
    """
    cb = getattr(inner, "_codebook", None)
    if not isinstance(cb, nn.Module) or state.kind not in ("vq", "vq-ema"):
        return
    learnable, ema = getattr(cb, "learnable_codebook", None), getattr(cb, "ema_update", None)
    if isinstance(learnable, bool) and isinstance(ema, bool):
        state.kind = "vq" if learnable or not ema else "vq-ema"
        state.notes = [n for n in state.notes if "EMA statistics" not in n]  # the module says it
    for attr in _LUCIDRAINS_ATTRS:
        v = getattr(cb, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            state.extra[attr] = float(v)
    if isinstance(getattr(cb, "decay", None), (int, float)):
        state.decay = float(cb.decay)
    if state.cluster_size is not None:
        ver = lucidrains_version()
        if ver is not None:
            state.ema_rule = "eps-blend" if ver >= (1, 33) else "laplace"


def _from_state(index: ModuleIndex, state: QuantizerState, raw_of: dict[str, str]) -> LiveQuantizer | None:
    found = _module_for(index, state, raw_of)
    if found is None:
        return None
    name, module = found
    if name != state.name:  # watched at the module that holds the table's layer
        state.name = name
    H = state.heads
    K, D = state.codebook_size, state.dim
    codebook, counts, param = _none, _none, None
    notes: list[str] = []
    ck = state.keys.get("codebook")
    if ck is not None and state.codebook is not None and state.kind != "simvq" \
            and "raw_codebook" not in state.extra:
        oa = _owner_attr(index, ck)
        if oa is not None:
            reader = _as_hkd_reader(_attr_reader(*oa), (H, K, D))
            if reader is not None:
                codebook = reader
                t = getattr(oa[0], oa[1], None)
                param = t if isinstance(t, nn.Parameter) else None
    if codebook is _none and state.kind not in ("fsq", "lfq"):
        notes.append("the live codebook could not be read (derived or transformed table): "
                     "no drift, code-norm or scale signals for it")
    nk = state.keys.get("cluster_size")
    if nk is not None:
        oa = _owner_attr(index, nk)
        if oa is not None:
            counts = _as_hk_reader(_attr_reader(*oa), H, K) or _none
    library = state.library
    inner = index.innermost(name)
    if library == "vector-quantize-pytorch":
        _lucidrains_live(state, inner)
    if state.metric != "cosine" and inner is not None and any(
            getattr(m, "use_cosine_sim", None) is True for m in (inner, getattr(inner, "_codebook", None))):
        # A state dict does not say it (before k-means init the codes are not yet unit-norm);
        # the live module does (vector-quantize-pytorch `use_cosine_sim`).
        state.metric = "cosine"
    input_dim = int(state.input_dim or D * max(state.input_heads, 1))
    index_heads = H if H > 1 else 1
    if library == "vector-quantize-pytorch" and inner is not None and int(getattr(inner, "heads", 1) or 1) > 1 \
            and not getattr(inner, "separate_codebook_per_head", False):
        notes.append("heads share one codebook: their indices are counted together")
    return LiveQuantizer(name=name, module=module, state=state, codebook=codebook, counts=counts,
                         codebook_param=param, index_heads=index_heads,
                         channel_first=_channel_first(module, library), code_dim=D, input_dim=input_dim,
                         project_in=_projection(module), replaces=_replaces(module),
                         notes=notes + list(state.notes))


def _from_spec(name: str, module: nn.Module, spec: LiveSpec) -> LiveQuantizer:
    cb_read = spec.codebook or _none
    cb = cb_read()
    H = int(spec.heads or 1)
    K = int(spec.codebook_size)
    D = int(spec.dim or (cb.shape[-1] if cb is not None else (len(spec.levels) if spec.levels else 0)))
    codebook: Callable[[], torch.Tensor | None] = _none
    if cb is not None:
        Hc = cb.shape[0] if cb.dim() == 3 else 1
        codebook = _as_hkd_reader(cb_read, (Hc, K, D)) or _none
    counts: Callable[[], torch.Tensor | None] = _none
    if spec.counts is not None and (c := spec.counts()) is not None:
        counts = _as_hk_reader(spec.counts, c.numel() // K if c.numel() % K == 0 else 1, K) or _none
    state = QuantizerState(name=name, kind=spec.kind, library=spec.library, codebook_size=K, dim=D,
                           codebook=None if cb is None else cb.detach().to("cpu", copy=True).reshape(-1, K, D),
                           levels=tuple(spec.levels) if spec.levels else None)
    return LiveQuantizer(name=name, module=module, state=state, codebook=codebook, counts=counts,
                         codebook_param=cb if isinstance(cb, nn.Parameter) else None, index_heads=H,
                         indices=spec.indices, quantized=spec.quantized, channel_first=spec.channel_first,
                         code_dim=D, input_dim=D * H)


def _classic(name: str, module: nn.Module, index: ModuleIndex) -> LiveQuantizer | None:
    """FSQ / LFQ of vector-quantize-pytorch, found by class (they store no codebook)."""
    inner = index.innermost(name) or module
    cls = type(inner).__name__
    group, stage = None, None
    parent, _, last = name.rpartition(".")
    gp, _, container = parent.rpartition(".")
    if container == "layers" and last.isdigit():
        owner = index.innermost(gp)
        if owner is not None and type(owner).__name__.startswith(("Residual", "Grouped")):
            group, stage = gp, int(last)
    if cls == "FSQ" and isinstance(getattr(inner, "_levels", None), torch.Tensor):
        from vqdoctor.quantizers.lucidrains import fsq_state

        levels = tuple(int(x) for x in inner._levels.detach().cpu().tolist())
        state = fsq_state(name, levels, group=group, stage=stage)
        heads = int(getattr(inner, "num_codebooks", 1) or 1) if getattr(inner, "keep_num_codebooks_dim", False) else 1
        return LiveQuantizer(name=name, module=module, state=state, codebook=_none, counts=_none,
                             index_heads=heads, channel_first=_channel_first(module, state.library),
                             code_dim=len(levels), input_dim=int(getattr(inner, "dim", len(levels)) or len(levels)),
                             project_in=_projection(module))
    if cls == "LFQ" and isinstance(getattr(inner, "codebook_size", None), int):
        K = int(inner.codebook_size)
        bits = int(round(math.log2(K))) if K > 0 else 0
        state = QuantizerState(name, "lfq", "vector-quantize-pytorch", K, bits, group=group, stage=stage)
        heads = int(getattr(inner, "num_codebooks", 1) or 1) if getattr(inner, "keep_num_codebooks_dim", False) else 1
        return LiveQuantizer(name=name, module=module, state=state, codebook=_none, counts=_none,
                             index_heads=heads, channel_first=_channel_first(module, state.library),
                             code_dim=bits, input_dim=int(getattr(inner, "dim", bits) or bits),
                             project_in=_projection(module))
    return None


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def find_quantizers(model: nn.Module, quantizers: Sequence[str | nn.Module] | None = None
                    ) -> list[LiveQuantizer]:
    """Every quantizer submodule of `model`, in module registration order.

    Args:
        model: the model (wrappers such as DDP or torch.compile are looked through).
        quantizers: restrict to these module paths (clean names, prefixes allowed) or modules.

    Returns:
        The live quantizers (may be empty when nothing was found and nothing was named).

    Raises:
        NoQuantizerError: a named quantizer was not found.
    """
    index = ModuleIndex(model)
    by_id = {id(m): c for c, m in index.clean_to_module.items()}
    named: list[str] = []
    for q in quantizers or ():
        if isinstance(q, nn.Module):
            if id(q) not in by_id:
                raise NoQuantizerError("the module passed in quantizers= is not part of the model")
            named.append(by_id[id(q)])
        else:
            named.append(str(q).rstrip("."))

    out: dict[str, LiveQuantizer] = {}
    # 1. registered adapters (a match also hides anything found inside it)
    if _ADAPTERS:
        for clean, m in index.clean_to_module.items():
            if any(_under(clean, n) and n != clean for n in out):
                continue
            inner = index.innermost(clean) or m
            spec = _registered(inner)
            if spec is not None:
                out[clean] = _from_spec(clean, m, spec)
    custom = list(out)

    # 2. state-dict discovery
    from vqdoctor.quantizers import discover

    src, raw_of = _source(model, index)
    try:
        states = discover(src, only=named or None) if src.infos else []
    except NoQuantizerError:
        states = []
    for s in states:
        # a checkpoint's only bare table is a guess; a live module shows by class or behaviour
        if any(_under(s.name, c) for c in custom) or (s.extra.get("guessed") and not named):
            continue
        lq = _from_state(index, s, raw_of)
        if lq is not None and lq.name not in out:
            out[lq.name] = lq

    # 2b. known quantizer classes under names the layouts do not expect (e.g. a root module)
    from vqdoctor.live.behaviour import by_class

    for s in by_class(index, [*out, *custom]):
        if not named or any(_under(s.name, n) or _under(n, s.name) for n in named):
            lq = _from_state(index, s, raw_of)
            if lq is not None and lq.name not in out:
                out[lq.name] = lq

    # 3. class-based detection of FSQ / LFQ
    for clean, m in index.clean_to_module.items():
        if clean in out or any(_under(clean, c) for c in custom):
            continue
        lq = _classic(clean, m, index)
        if lq is not None:
            out[clean] = lq

    found = list(out.values())
    if named:
        from vqdoctor.live.behaviour import table_quantizer

        found = [q for q in found if any(_under(q.name, n) for n in named)]
        for n in named:
            if any(_under(q.name, n) for q in found):
                continue
            # a module the user (or the behaviour test) names, in no known layout: its own table
            m = index.clean_to_module.get(n)
            lq = table_quantizer(n, m, index.innermost(n)) if m is not None else None
            if lq is not None:
                found.append(lq)
                continue
            if not any(_under(q.name, n) for q in found):
                raise NoQuantizerError(f"no quantizer found at {n!r}",
                                       hint="name a module path of the model (see model.named_modules()), "
                                            "or register an adapter with vqdoctor.register_adapter")
    pos = {c: i for i, c in enumerate(index.clean_to_module)}
    found.sort(key=lambda q: pos.get(q.name, 1 << 30))
    return found


def contains_compiled(model: nn.Module) -> bool:
    """True when the model is, or contains, a `torch.compile`d module."""
    for m in model.modules():
        if type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False
