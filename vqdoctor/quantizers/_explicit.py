"""`--quantizer PREFIX`: read the tensors under a prefix the user names as one quantizer.

Re-exported as `vqdoctor.quantizers.generic.explicit`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence

import torch

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.errors import NoQuantizerError
from vqdoctor.quantizers._common import Roles, join, read_projection
from vqdoctor.quantizers._tables import (
    FLAG_NAMES,
    build,
    flag_key,
    invariant_orientation,
    orientation,
)
from vqdoctor.quantizers.base import QuantizerState

_TABLE_NAMES = ("embed", "embedding", "embeddings", "codebook", "codes", "code_vectors", "weight")
_CODEBOOKISH = re.compile(r"codebook|embed|codes|code_vectors|quanti[sz]|vq")
_SUM_NAMES = ("embed_avg", "embed_sum", "ema_w", "ema_dw", "dw", "z_avg", "code_avg", "code_sum")
_COUNT_NAMES = ("cluster_size", "ema_cluster_size", "cluster_usage", "code_usage", "counts",
                "count", "usage", "N", "ema_count", "ema_counts", "embed_count")


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _is_stat(key: str) -> bool:
    """Keys that are never codebooks or EMA statistics (projections, layer biases)."""
    return "proj" in key or _leaf(key) == "bias"


def _maybe_counts(key: str) -> bool:
    """Vectors that may be EMA counts: not a layer's parameters or batch-norm statistics."""
    leaf = _leaf(key)
    return not _is_stat(key) and leaf not in FLAG_NAMES and leaf != "weight" \
        and not leaf.startswith(("running_", "num_batches"))


def _missing(src: TensorSource, prefix: str) -> NoQuantizerError:
    modules = sorted({k.rsplit(".", i)[0] for k in src.keys() for i in range(1, k.count(".") + 1)})
    close = difflib.get_close_matches(prefix, modules, n=5, cutoff=0.5)
    hint = (f"closest prefixes: {', '.join(close)}" if close else
            f"top-level prefixes: {', '.join(sorted({k.split('.')[0] for k in src.keys()})[:8])}")
    return NoQuantizerError(f"no tensors under '{prefix}'", path=src.path, hint=hint)


def _fsq(src: TensorSource, prefix: str, levels: Sequence[int], found: bool) -> QuantizerState:
    levels = tuple(int(x) for x in levels)
    roles = Roles(src)
    proj = read_projection(roles, join(prefix, "project_in"))
    project_in = proj[:2] if proj else None
    try:  # the lucidrains adapter owns the FSQ normal form when it is present
        from vqdoctor.quantizers.lucidrains import fsq_state
    except ImportError:
        state = QuantizerState(
            name=prefix, kind="fsq", library="user", codebook_size=math.prod(levels),
            dim=len(levels), levels=levels, project_in=project_in, keys=roles.keys,
            dtypes=roles.dtypes, input_dim=int(proj[0].shape[1]) if proj else len(levels))
    else:
        state = fsq_state(prefix, levels, project_in, library="user", keys=roles.keys,
                          dtypes=roles.dtypes)
    state.notes.append(f"FSQ levels {list(levels)} given by the user")
    if not found:
        state.notes.append(f"nothing is stored under '{prefix}' (an FSQ without projections "
                           "stores no tensors); check the name if a projection was expected")
    return state


def explicit(src: TensorSource, prefix: str, *, levels: Sequence[int] | None = None
             ) -> list[QuantizerState]:
    """The quantizer stored under `prefix`, whatever its layout.

    The codebook is the largest 2-D ([K, D] or [D, K]) or 3-D ([H, K, D]) float tensor, codebook
    names preferred and EMA sums avoided; a vector of length K is its counts (its length also
    tells a transposed table apart) and a table of the same shape its EMA sums.

    Args:
        src: the opened checkpoint.
        prefix: module path of the quantizer ("" for a bare quantizer).
        levels: FSQ levels; when given the result is an FSQ state (nothing else is stored).

    Raises:
        NoQuantizerError: no tensor under `prefix` (the message lists the closest prefixes), or
            no usable codebook among those found (the message lists them).
    """
    keys = [k for k in src.keys() if not prefix or k == prefix or k.startswith(prefix + ".")]
    if levels:
        return [_fsq(src, prefix, levels, bool(keys))]
    if not keys:
        raise _missing(src, prefix)
    if join(prefix, "frozen_codebook") in src.infos:  # SimVQ: K is the frozen codebook's rows
        from vqdoctor.quantizers.lucidrains import simvq_at

        state = simvq_at(src, prefix)
        if state is not None:
            state.library = "user"
            state.notes.insert(0, f"read as named by the user: SimVQ frozen codebook "
                                  f"{join(prefix, 'frozen_codebook')} and its code_transform")
            return [state]
    infos = src.infos
    tables = [k for k in keys if infos[k].dtype.is_floating_point and len(infos[k].shape) in (2, 3)
              and infos[k].numel > 0 and not _is_stat(k)]
    if not tables:
        found = ", ".join(f"{k} {list(infos[k].shape)} {infos[k].dtype}".replace("torch.", "")
                          for k in keys[:6])
        raise NoQuantizerError(
            f"'{prefix}' holds {len(keys)} tensor(s) but no codebook table: {found}", path=src.path,
            hint="a codebook is a 2-D [K, D] or 3-D [H, K, D] float tensor; FSQ needs --levels")
    table = max(tables, key=lambda k: (_leaf(k) in _TABLE_NAMES, bool(_CODEBOOKISH.search(k)),
                                       _leaf(k) not in _SUM_NAMES, infos[k].numel))
    tshape = infos[table].shape
    vectors = sorted((k for k in keys if len(infos[k].shape) == len(tshape) - 1
                      and _maybe_counts(k) and infos[k].dtype != torch.bool
                      and infos[k].shape[:-1] == tshape[:-2] and infos[k].shape[-1] in tshape[-2:]),
                     key=lambda k: _leaf(k) not in _COUNT_NAMES)
    counts = vectors[0] if vectors else None
    way = orientation(tshape[-2:], infos[counts].shape[-1]) if counts and len(tshape) == 2 else "kd"
    same = [k for k in tables if k != table and infos[k].shape == tshape]
    sums = max(same, key=lambda k: _leaf(k) in _SUM_NAMES) if same else None
    if way == "square" and sums:
        way = invariant_orientation(src, table, sums) or "kd"
    notes = [f"read as named by the user: codebook {table}"
             + (f", counts {counts}" if counts else "") + (f", EMA sums {sums}" if sums else "")]
    if tshape[-1] == tshape[-2]:
        notes.append(f"{table} is square: {'[D, K]' if way == 'dk' else '[K, D]'} order assumed")
    ema = bool(counts or sums)
    if ema:
        notes.append("Laplace-smoothing eps is not stored: assumed 1e-05")
    state = build(src, prefix, "vq-ema" if ema else "vq", "user", table, transposed=way == "dk",
                  counts=counts, sums=sums, flag=flag_key(src, prefix), notes=notes,
                  eps=1e-5 if ema else None)
    roles = Roles(src)
    proj = read_projection(roles, join(prefix, "project_in"))
    if proj:
        state.project_in, state.input_dim = proj[:2], int(proj[0].shape[1])
        state.keys.update(roles.keys)
        state.dtypes.update(roles.dtypes)
    return [state]
