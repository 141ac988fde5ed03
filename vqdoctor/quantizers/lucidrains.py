"""vector-quantize-pytorch: VectorQuantize, ResidualVQ, GroupedResidualVQ, LFQ, SimVQ, FSQ.

Layouts (docs/ema-and-layouts.md#state-dict-layouts): `P._codebook.{initted,cluster_size,embed_avg,embed}` ([H, K(, D)];
<= 1.26 `initted` (1,) float; before 0.9.0 a 2-D `embed`); residual stages `P.layers.{q}`, grouped
`P.rvqs.{g}.layers.{q}`, projection `project_in` on the module or its residual parent; LFQ `P.mask`
(int64 powers of two); SimVQ `P.frozen_codebook` + the parameters of `P.code_transform` (a Linear,
or a Sequential of layers, `simvq_at`); FSQ stores nothing but projections (and
`orthogonal_rot` when enabled), so it is found only when the config or the user (`--levels`)
names its levels (`fsq_from_levels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.metrics import functional as MF
from vqdoctor.quantizers._common import (
    Roles,
    apply_config,
    as_hk,
    as_hkd,
    config_value,
    flag_inconsistent,
    group_prefixes,
    join,
    mismatched,
    read_projection,
    split_stage,
    unclaimed,
    unit_rows,
)
from vqdoctor.quantizers.base import QuantizerState

LIBRARY = "vector-quantize-pytorch"
EPS = 1e-5
_AFFINE = ("codebook_mean", "codebook_variance", "codebook_mean_needs_init",
           "codebook_variance_needs_init", "batch_mean", "batch_variance")


def _project(r: Roles, name: str, group: str | None, st: QuantizerState) -> None:
    """Attach the module's own `project_in` (or its residual parent's) and claim `project_out`."""
    for owner in (name, group) if group is not None else (name,):
        for pin in ("project_in", "project_in.0"):
            proj = read_projection(r, join(owner, pin))
            if proj is not None:
                st.project_in, st.input_dim = proj[:2], int(proj[0].shape[1])
                st.input_heads = max(1, int(proj[0].shape[0]) // st.dim)
                if r.claim("project_in.norm.weight", join(owner, "project_in.1.weight")):
                    r.claim("project_in.norm.bias", join(owner, "project_in.1.bias"))
                    st.extra["layernorm_after_project_in"] = True
                r.claim_under("project_out", join(owner, "project_out"))
                return


# Norm floors of lucidrains' `l2norm` (F.normalize eps): 1e-6 at HEAD, torch's 1e-12 before.
_COSINE_NORM_EPS = (1e-6, 1e-12)


def _ema_consistent(embed: torch.Tensor, avg: torch.Tensor, n: torch.Tensor, cosine: bool,
                    rule: str = "laplace") -> bool:
    """lucidrains invariant under `rule` (`metrics.functional.EMA_RULES`) on every row.

    The invariant: docs/ema-and-layouts.md#checkpoint-consistency-checks.
    """
    r = MF.ema_residual(embed, avg, torch.nan_to_num(n), eps=EPS, cosine=cosine, rule=rule)
    return bool((r < 1e-3).all())


def _ema_rule(embed: torch.Tensor, avg: torch.Tensor, n: torch.Tensor, cosine: bool) -> tuple[str, str | None]:
    """Which EMA arithmetic the stored buffers satisfy, and a note when that had to be guessed.

    vector-quantize-pytorch <= 1.32 starts the counts at ones and divides by Laplace-smoothed
    counts; 1.34 starts both statistics at zero and computes (embed_avg + eps embed) /
    (cluster_size + eps). Rows with a small count tell them apart: the invariant of the wrong
    rule is off by ~1 there, the right one holds to ~eps / count. All-zero statistics exist only
    in the zero-initialising releases. The rule is reported with the quantizer (`ema_rule`).
    Both releases: docs/ema-and-layouts.md#vector-quantize-pytorch-releases.
    """
    fin = torch.isfinite(n)
    if bool((n[fin] == 0).all()) and bool((avg == 0).all()):
        return "eps-blend", None
    n0 = torch.where(fin, n, torch.zeros_like(n))

    def worst(rule: str) -> float:
        r = MF.ema_residual(embed, avg, n0, eps=EPS, cosine=cosine, rule=rule)
        r = r[torch.isfinite(r) & fin]
        return float(r.max()) if r.numel() else math.inf

    lap, blend = worst("laplace"), worst("eps-blend")
    if min(lap, blend) < 1e-3:
        return ("laplace" if lap <= blend else "eps-blend"), None
    # the invariant is broken either way: exact zero counts exist only with zero-initialised statistics
    zero = bool((n0 == 0).any())
    return ("eps-blend" if zero else "laplace"), (
        "EMA arithmetic: the buffers satisfy neither vector-quantize-pytorch rule; assumed "
        + ("(embed_avg + eps*embed)/(cluster_size + eps) (>= 1.34), as some counts are exactly 0."
           if zero else "embed_avg / Laplace-smoothed counts (<= 1.32), as no count is exactly 0."))


def _short_or_unit_rows(embed: torch.Tensor, tol: float) -> bool:
    """No row longer than 1 and some row of unit norm: what a cosine codebook with dead codes holds."""
    norms = embed.norm(dim=-1)
    return bool((norms <= 1 + tol).all() and ((norms - 1).abs() < tol).any())


def _never_updated(st: QuantizerState) -> bool:
    """Zero-initialised EMA statistics still all zero: no EMA update ever ran (1.34 arithmetic)."""
    n, avg = st.cluster_size, st.embed_avg
    return (st.ema_rule == "eps-blend" and n is not None and avg is not None
            and bool((n == 0).all()) and bool((avg == 0).all()))


def _kind(src: TensorSource, cb: str, st: QuantizerState) -> str:
    """EMA-updated or gradient-trained: config first, then what the stored statistics show."""
    ema, learnable = config_value(src, "ema_update"), config_value(src, "learnable_codebook")
    if ema is not None or learnable is not None:
        return "vq" if ema is False or learnable is True else "vq-ema"
    n, avg, embed = st.cluster_size, st.embed_avg, st.extra.get("raw_codebook", st.codebook)
    if n is None or avg is None:
        return "vq-ema"
    if bool((n == 1).all()) and not torch.equal(avg, embed):
        st.notes.append("EMA statistics never moved while the codebook did: read as a gradient-trained "
                        "codebook (learnable_codebook / ema_update=False).")
        return "vq"
    order = list(src.infos)
    # torch files keep registration order (Parameters before buffers); safetensors sort keys
    ordered = src.format in ("torch-zip", "torch-legacy")
    is_param = ordered and order.index(cb + "embed") < order.index(cb + "cluster_size")
    if _never_updated(st):
        if is_param or not ordered:
            st.notes.append("EMA statistics are all zero (never updated): read as a gradient-trained "
                            "codebook (learnable_codebook / ema_update=False).")
            return "vq"
        st.notes.append("EMA statistics are all zero: no EMA update has run (decay 1.0, ema_update "
                        "disabled, or the model never trained); usage cannot be read from the counts.")
        return "vq-ema"
    if is_param:  # Parameters precede buffers
        st.extra["is_parameter"] = True
        ok = (_ema_consistent(embed, avg, n, st.metric == "cosine", st.ema_rule or "laplace")
              and not bool((n == 1).all()))
        st.notes.append("codebook stored as a Parameter (learnable_codebook or orthogonal_reg_weight) and "
                        "no config says how it is updated: the EMA invariant "
                        + ("holds, EMA updates assumed." if ok else "is broken, gradient updates assumed."))
        return "vq-ema" if ok else "vq"
    return "vq-ema"


def _vq(src: TensorSource, taken: set[str]) -> list[QuantizerState]:
    out = []
    for name in group_prefixes(src.keys(), ("_codebook.embed", "_codebook.initted")):
        cb = join(name, "_codebook.")
        own = [k for k in src.infos if k.startswith(cb)]
        table = tuple(src.infos[cb + "embed"].shape)
        if len(table) not in (2, 3) or not unclaimed(own, taken):
            continue
        if bad := mismatched(src, {cb + "cluster_size": table[:-1], cb + "embed_avg": table}):
            flag_inconsistent(src, name, cb + "embed", bad)
            continue
        r, (group, stage) = Roles(src), split_stage(name)
        embed = as_hkd(r.read("codebook", cb + "embed"))
        n = r.read_opt("cluster_size", cb + "cluster_size")
        avg = r.read_opt("embed_avg", cb + "embed_avg")
        st = QuantizerState(
            name, "vq-ema", LIBRARY, int(embed.shape[1]), int(embed.shape[2]), codebook=embed,
            cluster_size=None if n is None else as_hk(n), embed_avg=None if avg is None else as_hkd(avg),
            eps=EPS, group=group, stage=stage,
            initted=bool(r.read("initted", cb + "initted").flatten()[0] > 0))
        cosine = config_value(src, "use_cosine_sim")
        tol = 1e-3 if src.infos[cb + "embed"].dtype in (torch.float32, torch.float64) else 2e-2
        if cosine is None and st.initted and unit_rows(embed, tol):
            cosine = True
            st.notes.append("cosine metric inferred from unit-norm codes (use_cosine_sim).")
        elif (cosine is None and st.initted and n is not None and avg is not None
              and _short_or_unit_rows(embed, tol)
              and any(_ema_consistent(embed, as_hkd(avg), as_hk(n), True, rule) for rule in MF.EMA_RULES)):
            # Long-dead codes of a cosine codebook are stored shorter than 1 (l2norm's norm floor).
            cosine = True
            st.notes.append("cosine metric inferred from codes = l2norm(embed_avg / counts) (use_cosine_sim).")
        st.metric = "cosine" if cosine else "euclidean"
        rule_note = None
        if st.cluster_size is not None and st.embed_avg is not None:
            raw = st.codebook  # before any affine transform: the statistics track the raw table
            st.ema_rule, rule_note = _ema_rule(raw, st.embed_avg, st.cluster_size, st.metric == "cosine")
        if cb + "codebook_mean" in src.infos:
            _affine(src, r, cb, st)
        st.kind = _kind(src, cb, st)
        if rule_note and st.kind == "vq-ema":  # a gradient-trained table has no EMA rule to satisfy
            st.notes.append(rule_note)
        _finish(src, r, st, group)
        st.input_heads = st.heads if st.heads > 1 else st.input_heads
        out.append(st)
        taken.update(r.keys.values())
    return out


def _affine(src: TensorSource, r: Roles, cb: str, st: QuantizerState) -> None:
    """`affine_param=True`: the lookup uses the table moved to the batch statistics (Huh et al.)."""
    for a in _AFFINE:
        r.claim(f"affine.{a}", cb + a)
    if not all(cb + a in src.infos for a in _AFFINE[4:]):  # batch stats appear after a forward
        return
    mean, var = src.get_float(cb + "codebook_mean"), src.get_float(cb + "codebook_variance")
    b_mean, b_var = src.get_float(cb + "batch_mean"), src.get_float(cb + "batch_variance")
    scale = b_var.clamp(min=1e-5).sqrt() / var.clamp(min=1e-5).sqrt()
    st.extra["raw_codebook"] = st.codebook
    st.codebook = (st.codebook - mean) * scale + b_mean
    st.notes.append("affine_param: codebook is the affine-transformed lookup table; the EMA "
                    "statistics track extra['raw_codebook'].")


def _finish(src: TensorSource, r: Roles, st: QuantizerState, group: str | None) -> None:
    """Projection, config facts, and the keys/dtypes collected so far."""
    _project(r, st.name, group, st)
    if st.input_dim is None:
        st.input_dim = st.dim * st.heads
    apply_config(src, st)
    st.keys, st.dtypes = r.keys, r.dtypes


def _lfq(src: TensorSource, taken: set[str]) -> list[QuantizerState]:
    out = []
    for name in group_prefixes(src.keys(), ("mask",)):
        key, info = join(name, "mask"), src.infos[join(name, "mask")]
        is_bits = info.dtype == torch.int64 and len(info.shape) == 1 and 0 < info.shape[0] <= 62
        if not is_bits or key in taken:
            continue
        bits = info.shape[0]
        if not torch.equal(src.get(key), 2 ** torch.arange(bits - 1, -1, -1)):
            continue
        r, (group, stage) = Roles(src), split_stage(name)
        r.claim("mask", key)
        st = QuantizerState(name, "lfq", LIBRARY, 2 ** bits, bits, group=group, stage=stage,
                            metric="cosine" if config_value(src, "spherical") else "euclidean")
        _finish(src, r, st, group)
        out.append(st)
        taken.update(r.keys.values())
    return out


def _simvq(src: TensorSource, taken: set[str]) -> list[QuantizerState]:
    out = []
    for name in group_prefixes(src.keys(), ("frozen_codebook",)):
        st = simvq_at(src, name, taken)
        if st is not None:
            out.append(st)
            taken.update(st.keys.values())
    return out


# SimVQ's `code_transform` is any module (default `nn.Linear(frozen_dim, dim, bias=False)`; the
# library's example is `nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)`). A state dict stores the
# parameters of its layers but not the parameter-free ones in between, whose type is unknown.
ASSUMED_ACTIVATION = "ReLU"


def _transform_layers(src: TensorSource, prefix: str) -> list[tuple[str, str | None, str | None]] | None:
    """`code_transform`'s layers in order: ("linear" | "norm" | "activation", weight key, bias key).

    None when its layout is not a Linear, an Identity, or a flat Sequential of Linear / norm layers
    and parameter-free modules.
    """
    base = join(prefix, "code_transform")
    keys = [k[len(base) + 1:] for k in src.infos if k.startswith(base + ".")]
    if not keys:
        return []  # nn.Identity: the frozen codebook is the codebook
    if "weight" in keys:
        if set(keys) - {"weight", "bias"}:
            return None
        return [("linear", join(base, "weight"), join(base, "bias") if "bias" in keys else None)]
    params: dict[int, set[str]] = {}
    for k in keys:
        idx, _, leaf = k.partition(".")
        if not idx.isdigit() or leaf not in ("weight", "bias"):
            return None
        params.setdefault(int(idx), set()).add(leaf)
    layers: list[tuple[str, str | None, str | None]] = []
    for i in range(max(params) + 1):
        if i not in params:
            layers.append(("activation", None, None))
            continue
        w = join(base, f"{i}.weight")
        b = join(base, f"{i}.bias") if "bias" in params[i] else None
        ndim = len(src.infos[w].shape) if w in src.infos else 0
        if ndim == 2:
            layers.append(("linear", w, b))
        elif ndim == 1:
            layers.append(("norm", w, b))
        else:
            return None
    return layers


def simvq_at(src: TensorSource, name: str, taken: set[str] | frozenset[str] = frozenset()
             ) -> QuantizerState | None:
    """The SimVQ at `name`: K from the frozen codebook's rows, the codebook code_transform(frozen).

    vector-quantize-pytorch 1.32 and 1.34 store `frozen_codebook` [K, frozen_dim] (a buffer) and
    the transform's parameters under `code_transform`; the lookup compares inputs with
    `code_transform(frozen_codebook)` [K, dim] (euclidean, `torch.cdist`). Linear layers are
    applied exactly; norm layers as LayerNorm; a parameter-free layer between them as
    `ASSUMED_ACTIVATION` (the library's example), said in a note. None when the layout is not one
    of these, or a key is taken.
    """
    fk = join(name, "frozen_codebook")
    info = src.infos.get(fk)
    layers = _transform_layers(src, name) if info is not None else None
    if info is None or len(info.shape) != 2 or layers is None:
        return None
    own = [fk, *(k for k in src.infos if k.startswith(join(name, "code_transform") + "."))]
    if not unclaimed(own, taken):
        return None
    r, (group, stage) = Roles(src), split_stage(name)
    x = r.read("codebook", fk)  # the stored (frozen) table; `codebook` below is the effective one
    described, assumed = [], False
    for kind, w, b in layers:
        if kind == "activation":
            x, assumed = F.relu(x), True
            described.append(f"{ASSUMED_ACTIVATION}?")
            continue
        rel = len(name) + 1 if name else 0  # role: the key below the quantizer
        weight = r.read(w[rel:], w)
        bias = r.read(b[rel:], b) if b else None
        if kind == "linear":
            if weight.shape[1] != x.shape[-1]:
                return None
            x = x @ weight.T + (bias if bias is not None else 0)
            described.append(f"Linear({weight.shape[1]}->{weight.shape[0]})")
        else:
            if weight.shape[0] != x.shape[-1]:
                return None
            x = F.layer_norm(x, (x.shape[-1],), weight, bias)
            described.append("LayerNorm")
    st = QuantizerState(name, "simvq", LIBRARY, int(info.shape[0]), int(x.shape[-1]),
                        codebook=x.unsqueeze(0), group=group, stage=stage,
                        extra={"frozen_dim": int(info.shape[1]),
                               "code_transform": ", ".join(described) or "Identity"})
    r.claim_under("code_transform", join(name, "code_transform"))
    if assumed:
        st.extra["assumed_activation"] = ASSUMED_ACTIVATION
        st.notes.append(f"SimVQ code_transform is {st.extra['code_transform']}: the layers without "
                        f"parameters are not stored; {ASSUMED_ACTIVATION} assumed (the library's "
                        "example), so the effective codebook is approximate if yours differ.")
    _finish(src, r, st, group)
    return st


def fsq_state(name: str, levels: Sequence[int],
              project_in: tuple[torch.Tensor, torch.Tensor | None] | None = None, *,
              library: str = LIBRARY, group: str | None = None, stage: int | None = None,
              keys: dict[str, str] | None = None, dtypes: dict[str, str] | None = None
              ) -> QuantizerState:
    """An FSQ quantizer in normal form (nothing of its grid is stored; levels come from config or user).

    Args:
        name: key prefix of the FSQ module.
        levels: levels per dimension, e.g. (8, 5, 5, 5); K = their product, D = their count.
        project_in: (weight [C * D, input_dim], bias) of the input projection, when stored.
        library: library to report.
        group: residual parent, for ResidualFSQ stages.
        stage: index within `group`.
        keys: source key per role (e.g. "project_in.weight").
        dtypes: stored dtype per role.
    """
    levels = tuple(int(x) for x in levels)
    st = QuantizerState(name, "fsq", library, math.prod(levels), len(levels), levels=levels,
                        group=group, stage=stage, project_in=project_in, keys=dict(keys or {}),
                        dtypes=dict(dtypes or {}), input_dim=len(levels))
    if project_in is not None:
        st.input_dim = int(project_in[0].shape[1])
        st.input_heads = max(1, int(project_in[0].shape[0]) // len(levels))
    return st


def _fsq(src: TensorSource, taken: set[str], others: bool) -> list[QuantizerState]:
    levels = config_value(src, "fsq_levels", "levels")
    if not (isinstance(levels, (list, tuple)) and levels and all(isinstance(x, int) and x >= 2 for x in levels)):
        return []
    out, n_q = [], int(config_value(src, "num_quantizers") or 1)
    for name in group_prefixes(src.keys(), ("project_in.weight", "project_out.weight")):
        pin = src.infos[join(name, "project_in.weight")].shape
        if len(pin) != 2 or pin[0] % len(levels) or join(name, "project_in.weight") in taken:
            continue
        r = Roles(src)
        proj = read_projection(r, join(name, "project_in"))
        r.claim_under("project_out", join(name, "project_out"))
        # ResidualFSQ: the top-level projection feeds every stage, the stages store nothing
        stages = [(join(name, f"layers.{q}"), name, q) for q in range(n_q)] if n_q > 1 else [(name, None, None)]
        out += [fsq_state(n, levels, proj[:2] if proj else None, group=g, stage=q, keys=r.keys,
                          dtypes=r.dtypes) for n, g, q in stages]
        taken.update(r.keys.values())
    if not out and not others:  # levels named, nothing stored: an FSQ without projections
        st = fsq_state("", levels)
        st.notes.append("FSQ levels come from the config; the quantizer stores no tensor, so its "
                        "name is unknown.")
        out.append(st)
    return out


def fsq_from_levels(src: TensorSource, claimed: set[str], levels: Sequence[int]) -> list[QuantizerState]:
    """FSQ quantizers for levels the user gives (`--levels`), where no config names them.

    An FSQ stores at most its projections (`project_in` [C * L, dim], `project_out` [dim, C * L],
    L = len(levels)) and, with `orthogonal_rotation`, `orthogonal_rot` [L, L]. Unclaimed modules
    of that layout are the candidates; those named like a quantizer win when several fit. With
    none, the FSQ stores nothing, and one nameless state says so.
    """
    from vqdoctor.quantizers._tables import looks_quantizer

    L = len(levels)
    found: list[tuple[str, tuple[torch.Tensor, torch.Tensor | None] | None, Roles]] = []
    for name in group_prefixes(src.keys(), ("project_in.weight", "project_out.weight")):
        pin, pout = join(name, "project_in.weight"), join(name, "project_out.weight")
        a, b = src.infos[pin].shape, src.infos[pout].shape
        if len(a) != 2 or len(b) != 2 or a[0] % L or a[0] // L > 64 or b[1] != a[0] or b[0] != a[1] \
                or not unclaimed((pin, pout), claimed):
            continue
        r = Roles(src)
        proj = read_projection(r, join(name, "project_in"))
        r.claim_under("project_out", join(name, "project_out"))
        r.claim("orthogonal_rot", join(name, "orthogonal_rot"))
        found.append((name, proj[:2] if proj else None, r))
    for name in group_prefixes(src.keys(), ("orthogonal_rot",)):
        key = join(name, "orthogonal_rot")
        if tuple(src.infos[key].shape) == (L, L) and unclaimed((key,), claimed) \
                and not any(n == name for n, _, _ in found):
            r = Roles(src)
            r.claim("orthogonal_rot", key)
            found.append((name, None, r))
    named = [f for f in found if looks_quantizer(f[0]) or "fsq" in f[0].lower()]
    out = []
    for name, proj, r in (named or found):
        st = fsq_state(name, levels, proj, keys=r.keys, dtypes=r.dtypes)
        st.notes.append(f"FSQ levels {list(levels)} given by the user; found by its layout "
                        f"({'project_in / project_out' if proj else 'orthogonal_rot'}).")
        out.append(st)
    if not out:
        st = fsq_state("", levels)
        st.notes.append(f"FSQ levels {list(levels)} given by the user; no FSQ projection is stored "
                        "(an FSQ with dim equal to len(levels) stores no tensor), so its name is "
                        "unknown and only a probe can measure it.")
        out.append(st)
    return out


class _Lucidrains:
    """Adapter for vector-quantize-pytorch layouts."""

    name = "lucidrains"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Every vector-quantize-pytorch quantizer in `src` (see module docstring for layouts)."""
        taken = set(claimed)
        found = _vq(src, taken) + _lfq(src, taken) + _simvq(src, taken)
        return found + _fsq(src, taken, bool(found))


ADAPTER = _Lucidrains()
