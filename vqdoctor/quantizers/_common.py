"""Small helpers shared by the quantizer adapters: key matching, shapes, reads, config look-ups.

Stable for adapter authors: `join`, `group_prefixes`, `split_stage`, `unclaimed`, `dtype_name`,
`as_hkd`, `as_hk`, `float_state`, `config_value`, `apply_config`, `Roles`, `read_projection`, `unit_rows`,
`flag_inconsistent`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers.base import QuantizerState

# Hyper-parameters copied from the checkpoint config into `QuantizerState.extra` when present.
CONFIG_EXTRAS = ("threshold_ema_dead_code", "reset_cluster_size", "dead_code_threshold_ratio",
                 "reset_cluster_size_ratio", "commitment_weight", "kmeans_init", "kmeans_iters",
                 "codebook_size")


# `TensorSource.meta` key of quantizers whose stored tensors contradict each other:
# prefix -> (one-line message, keys). Discovery reports them instead of guessing.
INCONSISTENT = "inconsistent_quantizers"


def _shape_text(shape: Sequence[int] | str) -> str:
    return shape if isinstance(shape, str) else "[" + ", ".join(str(int(x)) for x in shape) + "]"


def flag_inconsistent(src: TensorSource, prefix: str, table: str,
                      expected: dict[str, Sequence[int] | str]) -> None:
    """Record that a quantizer's EMA statistics do not fit its codebook.

    An adapter that recognises a layout by its key names but finds shapes that cannot belong
    together (counts of length K + 1, sums of another dim) calls this and skips the quantizer:
    reading it, or letting a later adapter guess at the same tensors, would measure nonsense.
    `discover` turns the record into a one-line error unless the user selected other quantizers.

    Args:
        src: the checkpoint.
        prefix: the quantizer's key prefix.
        table: key of its codebook.
        expected: key -> the shape it should have (a shape, or a text such as "[64] or [8]").
    """
    got = ", ".join(f"{k} is {_shape_text(src.infos[k].shape)} (expected {_shape_text(v)})"
                    for k, v in expected.items())
    message = (f"EMA statistics do not fit the codebook of quantizer {prefix or '(top level)'!r}: "
               f"{table} is {_shape_text(src.infos[table].shape)}, but {got}")
    src.meta.setdefault(INCONSISTENT, {})[prefix] = (message, [table, *expected])


def mismatched(src: TensorSource, want: dict[str, Sequence[int]]) -> dict[str, Sequence[int]]:
    """The keys of `want` that are stored with another shape."""
    return {k: v for k, v in want.items()
            if k in src.infos and tuple(src.infos[k].shape) != tuple(v)}


def join(prefix: str, name: str) -> str:
    """`prefix.name`, or `name` alone when the prefix is empty."""
    return f"{prefix}.{name}" if prefix else name


def group_prefixes(keys: Iterable[str], suffixes: Sequence[str]) -> list[str]:
    """Prefixes P, in key order, for which every `P.suffix` is a key.

    The first suffix anchors the search; "" stands for a bare module saved on its own.
    """
    ordered = list(keys)
    keyset, first, out = set(ordered), suffixes[0], []
    for k in ordered:
        if k == first:
            p = ""
        elif k.endswith("." + first):
            p = k[: -len(first) - 1]
        else:
            continue
        if all(join(p, s) in keyset for s in suffixes[1:]):
            out.append(p)
    return out


def split_stage(name: str, container: str = "layers") -> tuple[str | None, int | None]:
    """(`group`, `stage`) for a module named `GROUP.container.N`, else (None, None)."""
    m = re.fullmatch(rf"(?:(.*)\.)?{re.escape(container)}\.(\d+)", name)
    return (m.group(1) or "", int(m.group(2))) if m else (None, None)


def unclaimed(keys: Iterable[str], claimed: set[str]) -> bool:
    """True when none of `keys` was already taken by another quantizer."""
    return not any(k in claimed for k in keys)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def as_hkd(t: torch.Tensor) -> torch.Tensor:
    """A codebook-like table as [H, K, D] (a [K, D] table gets H = 1)."""
    return t.unsqueeze(0) if t.dim() == 2 else t


def as_hk(t: torch.Tensor) -> torch.Tensor:
    """Counts as [H, K] (a [K] vector gets H = 1)."""
    return t.unsqueeze(0) if t.dim() == 1 else t


def float_state(src: TensorSource, key: str) -> torch.Tensor:
    """One stored tensor as float32 (CPU)."""
    return src.get_float(key)


def _find(tree: Any, name: str, depth: int = 0) -> Any:
    if not isinstance(tree, dict) or depth > 6:
        return None
    if name in tree:
        return tree[name]
    for v in tree.values():
        found = _find(v, name, depth + 1)
        if found is not None:
            return found
    return None


def config_value(src: TensorSource, *names: str, default: Any = None) -> Any:
    """First of `names` found in `src.meta["config"]` (searched depth-first through nested dicts).

    Nested configs (Lightning hyper-parameters, audiocraft `rvq: {...}`) are common, so a name is
    looked up at any depth; the first name that is found anywhere wins.
    """
    config = src.meta.get("config")
    for name in names:
        value = _find(config, name)
        if value is not None:
            return value
    return default


def apply_config(src: TensorSource, state: QuantizerState) -> None:
    """Fill `decay` (EMA kinds) and `extra[...]` for CONFIG_EXTRAS from the checkpoint config."""
    if state.kind == "vq-ema" and state.decay is None:
        decay = config_value(src, "decay", "ema_decay")
        state.decay = float(decay) if isinstance(decay, (int, float)) else None
    for name in CONFIG_EXTRAS:
        value = config_value(src, name)
        if value is not None:
            state.extra[name] = value


@dataclass
class Roles:
    """Collects, per role, the key used and its stored dtype while an adapter reads tensors.

    Example:
        r = Roles(src)
        embed = r.read("codebook", "vq._codebook.embed")   # float32, key and dtype recorded
        r.claim("project_out.weight", "vq.project_out.weight")  # claimed, not read
        QuantizerState(..., keys=r.keys, dtypes=r.dtypes)
    """

    src: TensorSource
    keys: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def claim(self, role: str, key: str) -> bool:
        """Record `key` under `role` without reading it; False when the key does not exist."""
        info = self.src.infos.get(key)
        if info is None:
            return False
        self.keys[role] = key
        self.dtypes[role] = dtype_name(info.dtype)
        return True

    def claim_under(self, role: str, prefix: str) -> None:
        """Claim every key below module `prefix` (e.g. an unused `project_out`), as `role.<rest>`."""
        for key in [k for k in self.src.infos if k.startswith(prefix + ".")]:
            self.claim(f"{role}.{key[len(prefix) + 1:]}", key)

    def read(self, role: str, key: str) -> torch.Tensor:
        """Record `key` under `role` and return it as float32 (after `check_readable`)."""
        self.claim(role, key)
        check_readable(self.src, role, key)
        return self.src.get_float(key)

    def read_opt(self, role: str, key: str) -> torch.Tensor | None:
        """`read` when the key exists, else None."""
        return self.read(role, key) if key in self.src.infos else None


# Roles whose values are vectors in code space: an integer or bool table there is not a codebook
# (a quantized export, or another tensor under a codebook's name) and reading it as float would
# measure nonsense.
TABLE_ROLES = ("codebook", "embed_avg")


def check_readable(src: TensorSource, role: str, key: str) -> None:
    """Refuse a quantizer tensor that cannot be measured, with one line naming it.

    Raises:
        CheckpointError: the tensor is empty (a codebook with 0 codes or of dimension 0), or a
            codebook-like table is not floating point.
    """
    from vqdoctor.errors import CheckpointError

    info = src.infos[key]
    shape = "[" + ", ".join(str(int(x)) for x in info.shape) + "]"
    dtype = dtype_name(info.dtype)
    if info.numel == 0:
        what = "an empty codebook" if role == "codebook" else f"empty (the {role} of a quantizer)"
        zero = [i for i, x in enumerate(info.shape) if x == 0]
        why = ""
        if role == "codebook" and len(info.shape) >= 2:
            why = ": 0 codes" if zero and zero[0] == len(info.shape) - 2 else ": code dimension 0"
        raise CheckpointError(f"{key} is {what}, shape {shape}{why}; there is nothing to measure",
                              path=src.path, hint="the quantizer was saved before it was built, or the file was edited")
    if role in TABLE_ROLES and (info.dtype == torch.bool or not (info.dtype.is_floating_point
                                                                  or info.dtype.is_complex)):
        raise CheckpointError(f"{key} ({role}) has dtype {dtype}; a codebook is a floating-point "
                              f"table {shape}", path=src.path,
                              hint="a quantized or integer export must be converted back to float "
                                   "before it can be measured")


def read_projection(roles: Roles, prefix: str, role: str = "project_in"
                    ) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """A linear / 1x1-conv projection at `prefix` as (weight [out, in], bias or None, weight_norm).

    Resolves weight norm stored as `weight_g`/`weight_v` (torch.nn.utils.weight_norm) or
    `parametrizations.weight.original0/original1` (torch parametrizations): weight = g * v / ||v||,
    the norm taken over every dim but 0. Returns None when no weight is stored at `prefix`.
    """
    infos = roles.src.infos
    plain, g_old, v_old = join(prefix, "weight"), join(prefix, "weight_g"), join(prefix, "weight_v")
    g_new = join(prefix, "parametrizations.weight.original0")
    v_new = join(prefix, "parametrizations.weight.original1")
    pairs = [(g, v) for g, v in ((g_old, v_old), (g_new, v_new)) if g in infos and v in infos]
    shape_key = plain if plain in infos else (pairs[0][1] if pairs else None)
    # Only linear layers and 1x1 convolutions are projections of single vectors.
    shape = infos[shape_key].shape if shape_key else ()
    if len(shape) < 2 or any(s != 1 for s in shape[2:]):
        return None
    if plain in infos:
        weight, norm = roles.read(f"{role}.weight", plain), False
    else:
        g = roles.read(f"{role}.weight_g", pairs[0][0])
        v = roles.read(f"{role}.weight_v", pairs[0][1])
        dims = tuple(range(1, v.dim()))
        weight, norm = g * v / v.norm(dim=dims, keepdim=True), True
    bias = roles.read_opt(f"{role}.bias", join(prefix, "bias"))
    return weight.reshape(weight.shape[0], -1), bias, norm


def unit_rows(codebook: torch.Tensor, tol: float = 1e-3) -> bool:
    """True when every non-zero row of a non-zero [H, K, D] table has unit l2 norm (cosine codebooks).

    All-zero rows are skipped: a cosine codebook stores l2norm(embed_avg / count), which is the
    zero vector for a code whose EMA sums are zero (lucidrains: an empty k-means cluster).
    """
    norms = codebook.norm(dim=-1)
    live = norms[norms > 0]
    return bool(live.numel() > 0 and ((live - 1).abs() < tol).all())
