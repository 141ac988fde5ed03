"""Turn a loaded checkpoint object into flat tensor names: unwrap containers, strip wrapper prefixes,
lift optimizer state and plain metadata out.

Nothing here copies or reads tensor data: tensors are only referenced (they may be memory-mapped).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vqdoctor.checkpoint import numpy_safe
from vqdoctor.checkpoint.base import OPTIMIZER_PREFIX
from vqdoctor.checkpoint.limits import Walk
from vqdoctor.errors import CheckpointError, InputError

# Wrappers holding the main weights, most preferred first (Lightning, common scripts, audiocraft).
MAIN = ("state_dict", "model_state_dict", "model", "best_state")
# Exponential-moving-average copies of the weights (timm, Lightning callbacks, custom loops).
EMA = ("ema", "model_ema", "ema_state_dict", "state_dict_ema")
# Wrappers found *inside* a container: {'state_dict': {'model': ...}}, audiocraft {'best_state':
# {'model': ...}}, audiocraft EMA {'ema': {'state': {'model': ...}}}.
INNER = ("model", "state_dict", "model_state_dict", "state")
OPTIMIZERS = ("optimizer_states", "optimizer", "optimizer_state_dict", "opt")
# Top-level entries that may hold tensors but never model weights.
NOT_WEIGHTS = (*OPTIMIZERS, "lr_schedulers", "lr_scheduler", "scheduler", "callbacks", "loops",
               "scaler", "grad_scaler", "rng_state", "rng_states")
CONFIG_KEYS = ("hyper_parameters", "hparams", "config", "cfg", "args")
STEP_KEYS = ("global_step", "step", "iteration")


@dataclass
class Unwrapped:
    """Flat tensors and metadata taken out of one loaded checkpoint object.

    Attributes:
        tensors: flat key -> tensor (model weights, then `@optimizer/...` moments).
        container: dotted path of the wrapper the weights came from, "" for a raw state dict.
        meta: see `TensorSource.meta`.
    """

    tensors: dict[str, torch.Tensor]
    container: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def unwrap(obj: Any, path: str, container: str | None = None) -> Unwrapped:
    """Find the weights in a loaded checkpoint and flatten them.

    Args:
        obj: what `torch.load` returned.
        path: the file, for messages.
        container: wrapper to take the weights from (e.g. "ema"); None picks the main weights.

    Raises:
        InputError: `container` names a wrapper the file does not have.
        CheckpointError: the object is not a dict of tensors, or holds no tensors, or nests
            containers past `limits.MAX_DEPTH` / `limits.MAX_NODES` (walked boundedly: a pickle's
            memo can share one dict under itself, unrolling to 2^40 paths).
    """
    walk = Walk(path)
    if isinstance(obj, torch.nn.Module):  # trusted loads: a pickled module or TorchScript
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a dict of tensors", path=path)

    # Known wrappers win over loose top-level tensors ({'model': sd, 'loss': tensor(1.2)}).
    available = [k for k in (*MAIN, *EMA) if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k], walk)]
    chosen = pick_container(path, available, container)
    if chosen:
        name, weights = chosen, obj[chosen]
        for _ in range(3):
            if any(isinstance(v, torch.Tensor) for v in weights.values()):
                break
            inner = next((k for k in INNER if _has_tensors(weights.get(k), walk)), None)
            if inner is None:
                break
            name, weights = f"{name}.{inner}", weights[inner]
    else:
        name = ""
        weights = {k: v for k, v in obj.items() if k not in NOT_WEIGHTS}

    flat: dict[str, torch.Tensor] = {}
    _flatten(weights, "", flat, walk)
    tensors = {new: flat[old] for new, old in strip_prefixes(list(flat)).items()}

    meta: dict[str, Any] = {"containers": [k for k in available if k != chosen]}
    meta.update(_plain_meta(obj, walk))
    opt_tensors, entries = _optimizer_state(obj)
    if not tensors:
        what = " other than optimizer state" if opt_tensors else ""
        raise CheckpointError(f"holds no tensors{what}", path=path)
    if entries:
        meta["optimizer"] = entries
    tensors.update(opt_tensors)
    return Unwrapped(tensors, name, meta)


def pick_container(path: str, available: list[str], requested: str | None) -> str:
    """The container to read: `requested` (an exact name, or "ema" for any EMA copy), else the first.

    Raises:
        InputError: `requested` is not among `available`.
    """
    if requested is None:
        return available[0] if available else ""
    if requested in available:
        return requested
    if requested == "ema":
        for k in available:
            if k in EMA:
                return k
    raise InputError(f"has no container {requested!r}", path=path,
                     hint=f"available: {', '.join(available) if available else 'none (raw weights)'}")


def strip_prefixes(keys: list[str]) -> dict[str, str]:
    """Map names without wrapper prefixes to the stored names.

    `_orig_mod` (torch.compile) is dropped wherever it is a path component, since compiling a
    submodule puts it mid-path. `module.` (DDP / DataParallel, timm EMA) is dropped from the start
    only while every key has it, so a submodule that is really called `module` is kept. When
    stripping would make two names equal, names are left as stored.
    """
    new = [".".join(p for p in k.split(".") if p != "_orig_mod") for k in keys]
    while new and all(k.startswith("module.") for k in new):
        new = [k[len("module."):] for k in new]
    if len(set(new)) != len(new):
        return {k: k for k in keys}
    return dict(zip(new, keys, strict=True))


def _has_tensors(obj: Any, walk: Walk, depth: int = 0) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping) and depth < 8:
        walk.visit(0, len(obj))  # counted, never refused for depth: deeper is just "no"
        return any(_has_tensors(v, walk, depth + 1) for v in obj.values())
    return False


def is_weight(v: Any) -> bool:
    """A dense tensor: sparse, quantized and nested layouts are never codebooks."""
    return isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_quantized


def _flatten(obj: Mapping, prefix: str, out: dict[str, torch.Tensor], walk: Walk,
             depth: int = 0) -> None:
    walk.visit(depth, len(obj))
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if is_weight(v):
                out[key] = v
        elif isinstance(v, Mapping):
            _flatten(v, f"{key}.", out, walk, depth + 1)
        # anything else (ints, strings, lists, numpy arrays) is metadata, not weights


def _optimizer_state(obj: Mapping) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Moment tensors under `@optimizer/<opt>/<param>/<name>` and their `meta["optimizer"]` entries."""
    optimizers: list[Mapping] = []
    for k in OPTIMIZERS:
        v = obj.get(k)
        for o in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(o, Mapping) and isinstance(o.get("state"), Mapping):
                optimizers.append(o)
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    for oi, opt in enumerate(optimizers):
        names = _param_names(opt)
        for pidx, state in opt["state"].items():
            if not isinstance(state, Mapping):
                continue
            # 0-dim entries are step counters, not moments
            moments = {n: t for n, t in state.items() if is_weight(t) and t.ndim > 0}
            if not moments:
                continue
            index = int(pidx) if str(pidx).isdigit() else pidx
            keys = {n: f"{OPTIMIZER_PREFIX}{oi}/{index}/{n}" for n in moments}
            tensors.update({keys[n]: t for n, t in moments.items()})
            entry = {"index": index, "opt": oi,
                     "shape": tuple(max(moments.values(), key=lambda t: t.numel()).shape),
                     "keys": keys}
            if index in names:
                entry["name"] = names[index]
            entries.append(entry)
    return tensors, entries


def _param_names(opt: Mapping) -> dict[Any, str]:
    """Parameter index -> name, where the optimizer recorded names (torch >= 2.6 `param_names`)."""
    out: dict[Any, str] = {}
    for g in opt.get("param_groups") or []:
        if isinstance(g, Mapping) and isinstance(g.get("param_names"), (list, tuple)):
            out.update({i: n for i, n in zip(g.get("params", []), g["param_names"], strict=False)
                        if isinstance(n, str)})
    return dict(zip(out, strip_prefixes(list(out.values())), strict=True))


def _plain_meta(obj: Mapping, walk: Walk) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k in CONFIG_KEYS:
        cfg = _plain(obj.get(k), walk)
        if isinstance(cfg, dict) and cfg:
            meta["config"] = cfg
            break
    for k in STEP_KEYS:
        step = _int(obj.get(k))
        if step is not None:
            meta["global_step"] = step
            break
    epoch = _int(obj.get("epoch"))
    if epoch is not None:
        meta["epoch"] = epoch
    return meta


_DROP = object()


def _plain(v: Any, walk: Walk, depth: int = 0) -> Any:
    """A JSON-like copy of `v`; entries that are not plain data are left out.

    numpy scalars and small arrays (older save helpers' `np.float32(loss)`, `np.array(...)`)
    become Python numbers and lists.
    """
    if isinstance(v, argparse.Namespace):  # only reachable through trusted loads
        v = vars(v)
    v = numpy_safe.plain(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth > 16:
        return _DROP
    if isinstance(v, Mapping):
        walk.visit(0, len(v))
        items = ((str(k), _plain(x, walk, depth + 1)) for k, x in v.items())
        return {k: x for k, x in items if x is not _DROP}
    if isinstance(v, (list, tuple)):
        walk.visit(0, len(v))
        return [x for x in (_plain(x, walk, depth + 1) for x in v) if x is not _DROP]
    return _DROP


def _int(v: Any) -> int | None:
    v = numpy_safe.plain(v)  # np.int64(3) from an older save helper
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if is_weight(v) and v.device.type == "cpu" and v.numel() == 1 and not v.is_floating_point():
        return int(v.item())
    return None
