"""Bounds on what reading an input may cost: memory, expansion, nesting.

A small file must not cost unbounded time or memory. Before a tensor is materialised (read,
converted to float32, reshaped) its size is checked against a memory budget, and against what
the file really stores for it: a stride-0 (expanded) or overlapping view, or an archive member
deflated from a run of zeros, describes gigabytes with a few bytes. The rules (docs in the
README, "Safe by default"):

- anything read as float32 may take at most the budget (`max_memory`, default 1 GiB);
- data that expands more than `EXPANSION_RATIO`-fold over the bytes the file stores for it may
  take at most 1/`EXPANSION_SHARE` of the budget (64 MiB by default): a real checkpoint never
  needs that, and it is how a file of a few KB asks for gigabytes;
- nested containers are walked at most `MAX_DEPTH` deep and `MAX_NODES` entries in all (a
  pickle's memo can share one dict under itself 40 times: 2^40 paths from a 2 KB file).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from vqdoctor.errors import CheckpointError, MemoryBudgetError

DEFAULT_MAX_MEMORY = 1 << 30
"""Bytes one input tensor may take once read as float32 (the `--max-memory` default)."""
EXPANSION_RATIO = 16
"""Logical size over stored size above which data counts as expanded (a real view or
compressed float data stays far below it)."""
EXPANSION_SHARE = 16
"""Expanded data may take 1/EXPANSION_SHARE of the budget."""
MAX_DEPTH = 64
"""Levels of nested dicts a checkpoint's weights are looked for in (real ones use < 10)."""
MAX_NODES = 1_000_000
"""Container entries walked in all (real checkpoints: ~10^4 tensors, a few config entries each)."""
BUDGET_HINT = "raise it with --max-memory (max_memory=) if you trust the file and have the memory"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: int | float | str | None) -> int:
    """Bytes from `4GiB`, `512MiB`, `2G` (decimal), `1e9` or a number; None gives the default.

    Raises:
        ValueError: not a size, or not positive.
    """
    if value is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"not a size: {value!r} (e.g. 4GiB, 512MiB, 2G or a number of bytes)")
        n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"a memory budget must be at least 1 byte, got {value!r}")
    return int(n)


def format_size(n: float) -> str:
    """`1073741824` -> `1 GiB`, `4` -> `4 bytes`."""
    if n < 1024:
        return f"{int(n)} byte{'s' * (int(n) != 1)}"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
    return f"{n:.3g} PiB"  # pragma: no cover


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """`[65536, 4096]`."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


@dataclass(frozen=True)
class Layout:
    """How a loaded tensor sits on the data its file stores.

    Attributes:
        stored_bytes: bytes of the storage the tensor can reach (from its offset on).
        view: "stride-0" (an expanded view), "overlapping" (elements share storage), or None.
    """

    stored_bytes: int
    view: str | None


def layout(t: torch.Tensor) -> Layout | None:
    """The storage behind a strided tensor; None when it is stored one-to-one (nothing to check)."""
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        return None
    n = t.numel()
    if n <= 1:
        return None
    try:
        storage = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    itemsize = t.element_size()
    stored = max(0, storage - t.storage_offset() * itemsize)
    stride0 = any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride(), strict=True))
    if stride0:
        return Layout(stored, "stride-0")
    if n * itemsize > stored:
        return Layout(stored, "overlapping")
    return None


def check_size(what: str, shape: tuple[int, ...], itemsize: int, budget: int, *,
               stored_bytes: int | None = None, view: str | None = None, path: str | None = None,
               dtype: str = "", as_float: bool = True) -> None:
    """Refuse to materialise `what` when it is over the budget, or expanded over its share.

    Args:
        what: the tensor or member, as the message names it (e.g. "tensor vq._codebook.embed").
        shape: its logical shape.
        itemsize: bytes per element as stored.
        budget: the memory budget in bytes.
        stored_bytes: bytes the file stores for it, when that is less than its logical size.
        view: "stride-0" / "overlapping" / "deflated", said in the message.
        path: the file, for the message.
        dtype: its dtype name, for the message.
        as_float: it will be read as float32 (cost: 4 bytes an element at least); False for
            raw bytes (an archive member), whose shape is then `(nbytes,)`.

    Raises:
        MemoryBudgetError: with what, how big, and the option that raises the budget.
    """
    n = math.prod(int(s) for s in shape)
    logical = n * itemsize
    cost = n * max(itemsize, 4) if as_float else logical  # what reading it allocates
    kind = f"{shape_text(shape)}{' ' + dtype if dtype else ''}" if as_float else format_size(logical)
    if stored_bytes is not None and logical > EXPANSION_RATIO * max(stored_bytes, 1) \
            and cost > budget // EXPANSION_SHARE:
        how = {"stride-0": "a stride-0 (expanded) view", "overlapping": "an overlapping view",
               "deflated": "deflated data"}.get(view or "", "data")
        raise MemoryBudgetError(
            f"{what} is {how}: {kind}{f' ({format_size(cost)} to read)' if as_float else ''} from "
            f"{format_size(stored_bytes)} "
            f"stored; data that expands over {EXPANSION_RATIO}x may take {format_size(budget // EXPANSION_SHARE)} "
            f"(1/{EXPANSION_SHARE} of the {format_size(budget)} memory budget)",
            path=path, hint=BUDGET_HINT, needed=cost, budget=budget)
    if cost > budget:
        raise MemoryBudgetError(
            f"{what} is {kind}{f': {format_size(cost)} to read' if as_float else ''}, over the "
            f"{format_size(budget)} memory budget",
            path=path, hint=BUDGET_HINT, needed=cost, budget=budget)


class Walk:
    """A shared count of container entries visited, so one file's structure is walked boundedly.

    Example:
        walk = Walk(path)
        for k, v in obj.items():
            walk.visit(depth)     # raises CheckpointError past MAX_NODES or MAX_DEPTH
    """

    def __init__(self, path: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH):
        self.path, self.max_nodes, self.max_depth = path, max_nodes, max_depth
        self.nodes = 0

    def visit(self, depth: int, n: int = 1) -> None:
        """Count `n` entries at `depth`; raise when the walk goes past its bounds."""
        self.nodes += n
        if self.nodes > self.max_nodes:
            raise CheckpointError(
                f"holds more than {self.max_nodes:,} nested entries (containers that share "
                "themselves, as a pickle's memo allows, unroll to more paths than any model has)",
                path=self.path)
        if depth > self.max_depth:
            raise CheckpointError(f"holds containers nested more than {self.max_depth} deep "
                                  "(no checkpoint nests its weights like that)", path=self.path)


__all__ = ["BUDGET_HINT", "DEFAULT_MAX_MEMORY", "EXPANSION_RATIO", "EXPANSION_SHARE", "Layout",
           "MAX_DEPTH", "MAX_NODES", "Walk", "check_size", "format_size", "layout", "parse_size",
           "shape_text"]
