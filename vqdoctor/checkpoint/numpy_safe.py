"""numpy arrays, dtypes and scalars for the weights-only unpickler, scoped to one load.

Older save helpers put numpy values beside the weights (`{'epoch': np.int64(3), 'loss':
np.float32(0.1), 'stats': np.array(...)}`, `np.random.get_state()`). torch's weights-only loader
refuses them unless their globals are allow-listed, which torch documents doing with
`torch.serialization.safe_globals([...])`; `allowed()` is that context manager, for our
`torch.load` call only (never `add_safe_globals`, which would change every later load in the
process).

What is allowed, and why nothing from the file can run through it:
- `numpy.ndarray` and the `_reconstruct` / `scalar` functions numpy's own pickles call, under
  both numpy 1 (`numpy.core.multiarray`) and numpy 2 (`numpy._core.multiarray`) names;
- `numpy.dtype` and its per-type classes (numpy >= 1.25 builds dtypes of those classes, and the
  unpickler only restores state into allow-listed types).
The array class is a checked subclass and `_reconstruct` a checked wrapper: the subtype must be
that class (an attacker's class could only come from another global, which stays refused), and a
declared shape over the memory budget is refused before numpy allocates it. An array's state
(`__setstate__`) must carry as many bytes as its shape needs, so data comes from the file; an
object array holds only what the unpickler itself built. Everything else numpy offers
(`numpy.load`, `numpy.frombuffer`, `numpy.memmap`, ...) stays refused, and is named in the error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from vqdoctor.checkpoint.limits import BUDGET_HINT, DEFAULT_MAX_MEMORY, format_size

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a runtime dependency of torch's users here
    np = None  # type: ignore[assignment]


_budget = [DEFAULT_MAX_MEMORY]


class OverBudget(ValueError):
    """A pickled numpy array declares a shape over the memory budget."""


def _check_shape(shape: Any, itemsize: int = 8) -> None:
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    n = math.prod(int(d) for d in dims)
    if n < 0 or n * max(itemsize, 1) > _budget[0]:
        raise OverBudget(f"declares a numpy array of shape {list(dims)}, over the "
                         f"{format_size(_budget[0])} memory budget")


if np is not None:
    _multiarray = getattr(np, "_core", None) or np.core
    _reconstruct_impl = _multiarray.multiarray._reconstruct
    _scalar_impl = _multiarray.multiarray.scalar

    class CheckedArray(np.ndarray):
        """`numpy.ndarray` as the unpickler may build it: shapes over the budget are refused."""

        def __new__(cls, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> Any:
            _check_shape(shape, np.dtype(dtype).itemsize)
            return np.ndarray.__new__(cls, shape, dtype, *args, **kwargs)

    def checked_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        """numpy's `_reconstruct` for `CheckedArray` only, with the declared shape checked."""
        if subtype is not CheckedArray:
            raise TypeError(f"numpy _reconstruct of {subtype!r} is not allowed")
        _check_shape(shape)
        # built as CheckedArray, the type the unpickler may restore state into (BUILD)
        return _reconstruct_impl(CheckedArray, shape, dtype)

    def _globals() -> list[Any]:
        out: list[Any] = []
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out += [(checked_reconstruct, f"{mod}._reconstruct"), (_scalar_impl, f"{mod}.scalar")]
        out += [(CheckedArray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
        dtypes = getattr(np, "dtypes", None)
        if dtypes is not None:  # numpy >= 1.25: a dtype's class, which BUILD restores state into
            out += [(c, f"numpy.dtypes.{n}") for n in dir(dtypes)
                    if isinstance(c := getattr(dtypes, n), type) and issubclass(c, np.dtype)]
        return out


def safe_names() -> set[str]:
    """Qualified names `allowed()` lets through (left out when a refusal lists what a file needs)."""
    return {name for _, name in _globals()} if np is not None else set()


@contextlib.contextmanager
def allowed(max_memory: int = DEFAULT_MAX_MEMORY) -> Iterator[None]:
    """Allow numpy arrays, dtypes and scalars in weights-only loads inside the block."""
    if np is None:  # pragma: no cover
        yield
        return
    import torch

    previous = _budget[0]
    _budget[0] = max_memory
    try:
        with torch.serialization.safe_globals(_globals()):
            yield
    finally:
        _budget[0] = previous


def plain(v: Any) -> Any:
    """A numpy scalar or a small array as Python data; anything else unchanged.

    Arrays of more than 1024 elements are dropped (None): metadata is for a report, and a shape
    declared by the file must not decide how much is copied.
    """
    if np is None:  # pragma: no cover
        return v
    if isinstance(v, np.generic):
        return v.item() if v.dtype.kind in "biufcUS" else None
    if isinstance(v, np.ndarray):
        if v.size > 1024 or v.dtype.kind not in "biufUS":
            return None
        return np.asarray(v).tolist()
    return v


__all__ = ["BUDGET_HINT", "OverBudget", "allowed", "plain", "safe_names"]
