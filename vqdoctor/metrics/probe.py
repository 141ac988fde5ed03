"""Probe metrics: what the quantizer does with real encoder outputs (the PROBE names of `metrics.names`).

A probe is a tensor file of vectors that enter the quantizer (`vqdoctor inspect --probe`).
`read_probe` / `load_probe` (in `probe_load`) read it safely and boundedly, `probe_inputs` maps
it onto the discovered quantizers (dict entries by name, else by shape; tensors by dimension,
chaining residuals through residual stages), `probe_metrics` measures one quantizer on its
vectors: assignment usage, input vs code scale, quantisation error, and FSQ/LFQ level and bit
statistics.
"""

from __future__ import annotations

import math

import torch

from vqdoctor.errors import ProbeError
from vqdoctor.metrics import device as MD
from vqdoctor.metrics import functional as F
from vqdoctor.metrics import geometry as G
from vqdoctor.metrics.codebook import PAIRWISE_MAX_CODES
from vqdoctor.metrics.probe_load import WRAPPER_KEYS, LoadedProbe, Probe, load_probe, read_probe
from vqdoctor.quantizers.base import QuantizerState

# Libraries whose quantizer inputs are channels-last [B, T, C]; the rest are conv codecs / image
# models with channels-first [B, C, ...]. Only used to break the tie when T == C.
CHANNELS_LAST_LIBRARIES = {"vector-quantize-pytorch", "sonnet", "zalando", "generic"}


def expected_input_dim(q: QuantizerState) -> int:
    """Dimension of the vectors a quantizer takes: input_dim, else project_in's input, else dim * input_heads."""
    if q.input_dim is not None:
        return int(q.input_dim)
    if q.project_in is not None:
        return int(q.project_in[0].shape[1])
    return int(q.dim * q.input_heads)


def code_space_dim(q: QuantizerState) -> int:
    """Dimension after `project_in`: input_heads x dim."""
    return int(q.dim * q.input_heads)


def _flatten(z: torch.Tensor, c: int, channels_last_first: bool) -> torch.Tensor | None:
    """[N, C], [B, C, *spatial] or [B, *, C] -> [n, C]; None when no axis has size c."""
    if z.ndim == 1:
        return z.reshape(1, -1) if z.shape[0] == c else None
    if z.ndim == 2:
        return z if z.shape[1] == c else None
    last, first = z.shape[-1] == c, z.shape[1] == c
    if last and (channels_last_first or not first):
        return z.reshape(-1, c)
    if first:
        return z.movedim(1, -1).reshape(-1, c)
    return None


def _project(q: QuantizerState, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T + b with the quantizer's input projection (identity when it has none)."""
    if q.project_in is None:
        return x
    w, b = q.project_in
    w = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    y = x @ w.T
    return y + b.detach().to(torch.float32) if b is not None else y


def _same_projection(states: list[QuantizerState]) -> bool:
    """True when every stage carries one group-level projection (lucidrains ResidualVQ `project_in`)."""
    scopes = {s.extra.get("project_in_scope") for s in states} - {None}
    if scopes:
        return scopes == {"group"}
    p0 = states[0].project_in
    for s in states[1:]:
        p = s.project_in
        if (p is None) != (p0 is None):
            return False
        if p is not None and p0 is not None:
            if p[0] is not p0[0] and (p[0].shape != p0[0].shape or not torch.equal(p[0], p0[0])):
                return False
            if (p[1] is None) != (p0[1] is None):
                return False
            if p[1] is not None and p0[1] is not None and p[1] is not p0[1] and not torch.equal(p[1], p0[1]):
                return False
    return True


def _quantize(q: QuantizerState, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign code-space vectors `[n, input_heads * D]` to codes.

    Returns (indices [n, h], distances [n, h], quantized [n, h * D]); heads look up their own
    codebook when H == input_heads, else all heads share codebook 0.
    """
    cb = F.as_hkd(q.codebook.detach())
    h, D = q.input_heads, q.dim
    if cb.shape[0] not in (1, h):
        raise ProbeError(f"probe for {q.name or 'quantizer'}: {h} input heads do not map onto {cb.shape[0]} codebooks")
    xs = x.reshape(x.shape[0], h, D)
    idx = torch.empty(x.shape[0], h, dtype=torch.long)
    dist = torch.empty(x.shape[0], h, dtype=torch.float64)
    quant = torch.empty_like(xs)
    for i in range(h):
        e = cb[i if cb.shape[0] == h else 0].to(torch.float32)
        idx[:, i], dist[:, i] = F.nearest_codes(xs[:, i], e, q.metric)
        quant[:, i] = e[idx[:, i]]
    return idx, dist, quant.reshape(x.shape[0], h * D)


def _match_names(keys: list[str], states: list[QuantizerState]) -> dict[str, str]:
    """state name -> probe key: exact, else a unique dotted-suffix match in either direction."""

    def related(a: str, b: str) -> bool:
        return bool(a) and bool(b) and (a.endswith("." + b) or b.endswith("." + a))

    out = {}
    for s in states:
        if s.name in keys:
            out[s.name] = s.name
            continue
        cands = [k for k in keys if related(s.name, k)]
        if len(cands) == 1 and sum(related(t.name, cands[0]) or t.name == cands[0] for t in states) == 1:
            out[s.name] = cands[0]
    return out


def _note(q: QuantizerState, text: str) -> None:
    if text not in q.notes:
        q.notes.append(text)


def probe_inputs(z_all: Probe | LoadedProbe, states: list[QuantizerState], *,
                 path: str) -> dict[str, torch.Tensor]:
    """Map a probe onto quantizers: each quantizer's vectors in its code space, `[n, input_heads * dim]`.

    A dict is matched to quantizers by name first (exact, or a unique dotted-suffix match), then
    by shape (`match_by_shape`): an entry with a quantizer's input dim (projected here), else one
    with its code-space dim after `project_in`, is used when it is the only one that fits; a
    single entry is read as one tensor. Which entry each quantizer got is said in a note (and in
    `LoadedProbe.used`). A tensor of shape [N, C], [B, C, *spatial] (channels-first) or [B, T, C]
    (channels-last) is flattened to [n, C] where C is the quantizer's expected input
    (`expected_input_dim`), and goes to stand-alone quantizers and to stage 0 of residual groups.
    Later residual stages get x_{s+1} = x_s - q_s(x_s), the residual the library quantizes, in
    the space the stages share: a group-level projection (the same `project_in` on every stage,
    or `extra["project_in_scope"] == "group"`) is applied once; with per-stage projections (DAC)
    or implicit codebooks (residual FSQ/LFQ) chaining stops at stage 0 and those stages get a
    note asking for per-stage probes.

    Every returned tensor is already projected (`project_in` applied): pass `projected=True`
    to `probe_metrics`.

    Args:
        z_all: what `read_probe` (or `load_probe`) returned.
        states: the discovered quantizers (notes may be appended to them).
        path: the probe file, for messages.

    Returns:
        quantizer name -> float32 `[n, input_heads * dim]`.

    Raises:
        ProbeError: nothing fits (naming the probe's shape and each quantizer's expected dim), or
            several entries fit one quantizer equally (naming them and how to choose).
    """
    loaded = z_all if isinstance(z_all, LoadedProbe) else LoadedProbe(z_all, path=path)
    value = loaded.value
    if loaded.key is not None:
        path = f"{loaded.path}:{loaded.key}"
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, dict) and len(value) == 1:
        key, value = next(iter(value.items()))  # a single entry: read as one tensor
        loaded = LoadedProbe(value, path=loaded.path, key=key, notes=loaded.notes, used=loaded.used)
    if isinstance(value, dict):
        out = _dict_inputs(value, loaded, states, path)
    else:
        out = _tensor_inputs(value, states, path)
        if loaded.key is not None:
            for name in out:
                loaded.used[name] = loaded.key
    for s in states:
        if s.name in out:
            for text in loaded.notes:
                _note(s, text)
    return out


def _tensor_inputs(z_all: torch.Tensor, states: list[QuantizerState], path: str,
                   only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """One tensor onto every quantizer (or those in `only`) it fits, residuals chained."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[QuantizerState]] = {}
    for s in states:
        if s.group is None or s.stage is None:
            if only is not None and s.name not in only:
                continue
            x = _flatten(z_all, expected_input_dim(s), s.library in CHANNELS_LAST_LIBRARIES)
            if x is not None:
                out[s.name] = _project(s, x)
        else:
            groups.setdefault(s.group, []).append(s)
    for stages in groups.values():
        stages.sort(key=lambda s: s.stage)
        first = stages[0]
        if first.stage != 0 or (only is not None and first.name not in only):
            continue
        x = _flatten(z_all, expected_input_dim(first), first.library in CHANNELS_LAST_LIBRARIES)
        if x is None:
            continue
        x = _project(first, x)
        out[first.name] = x
        if len(stages) == 1:
            continue
        implicit = any(s.codebook is None for s in stages)
        if implicit or not _same_projection(stages):
            why = "implicit codebooks (FSQ/LFQ)" if implicit else "its own input projection"
            for s in stages[1:]:
                _note(s, f"probe: stage {s.stage} has {why}, so the probe's residual cannot be carried to it; "
                         f"pass a dict probe with an entry '{s.name}' holding that stage's input to measure it.")
            continue
        for prev, s in zip(stages, stages[1:], strict=False):
            if s.stage != prev.stage + 1 or code_space_dim(s) != x.shape[1]:
                break
            x = x - _quantize(prev, x)[2]
            out[s.name] = x
    if not out and only is None:
        shape = f"dim {z_all.shape[-1]}" if z_all.ndim <= 2 else f"shape {list(z_all.shape)}"
        raise _no_fit(f"probe {path} has {shape}", states)
    return out


def _shape_text(z: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(x)) for x in z.shape) + "]"


def match_by_shape(entries: dict[str, torch.Tensor], s: QuantizerState) -> tuple[list[str], str]:
    """The entries that fit quantizer `s` by shape, and how: ([keys], "input" | "code").

    Entries with the quantizer's input dim win over those with its code-space dim (after
    `project_in`): the input is what the quantizer receives, and its projection is applied
    here exactly. More than one key returned means the shape cannot choose.
    """
    cl = s.library in CHANNELS_LAST_LIBRARIES
    raw, code = expected_input_dim(s), code_space_dim(s)
    by_raw = [k for k, z in entries.items() if _flatten(z, raw, cl) is not None]
    if by_raw or raw == code:
        return by_raw, "input"
    return [k for k, z in entries.items() if _flatten(z, code, cl) is not None], "code"


def _dict_inputs(z_all: dict[str, torch.Tensor], loaded: LoadedProbe, states: list[QuantizerState],
                 path: str) -> dict[str, torch.Tensor]:
    """Entries by quantizer name, then the rest by shape; see `probe_inputs`."""
    out: dict[str, torch.Tensor] = {}
    matched = _match_names(list(z_all), states)
    for s in states:
        if s.name in matched:
            x = _dict_entry(z_all[matched[s.name]], s)
            if x is not None:
                out[s.name] = x
                loaded.used[s.name] = matched[s.name]
    if matched and not out:
        raise _no_fit(f"probe {path} entries {', '.join(sorted(set(matched.values())))} do not "
                      "have the dimension of their quantizers", states)
    # By shape: quantizers that take a probe directly (stand-alone, stage 0 of a group) and got
    # nothing by name, from entries no name claimed. Integer entries are indices or labels.
    free = {k: z for k, z in z_all.items() if k not in matched.values() and k not in loaded.integer_keys}
    heads = [s for s in states if s.name not in out and s.stage in (None, 0)]
    ambiguous: list[tuple[QuantizerState, list[str], str]] = []
    for s in heads:
        keys, how = match_by_shape(free, s)
        if len(keys) > 1:
            ambiguous.append((s, keys, how))
        elif keys:
            key = keys[0]
            got = _tensor_inputs(z_all[key], states, path, only={s.name})
            if not got and how == "code":  # already projected: used as is, no chaining
                x = _flatten(z_all[key], code_space_dim(s), s.library in CHANNELS_LAST_LIBRARIES)
                got = {s.name: x} if x is not None else {}
            for name, x in got.items():
                out.setdefault(name, x)
                loaded.used.setdefault(name, key)
            dim = expected_input_dim(s) if how == "input" else code_space_dim(s)
            space = "input dim" if how == "input" else "code-space dim after its project_in"
            others = [k for k in free if k != key]
            _note(s, f"probe: entry '{key}' {_shape_text(z_all[key])} used as this quantizer's input "
                     f"(matched by shape: the only entry with its {space}, {dim})"
                     + (f"; not used: {', '.join(repr(k) for k in others[:4])}" if others else "") + ".")
    if ambiguous:
        s, keys, how = ambiguous[0]
        dim = expected_input_dim(s) if how == "input" else code_space_dim(s)
        cands = ", ".join(f"'{k}' {_shape_text(z_all[k])}" for k in keys[:6])
        raise ProbeError(f"probe {path}: entries {cands} all fit quantizer '{s.name or '(top level)'}' "
                         f"({'input' if how == 'input' else 'code-space'} dim {dim}); choose one with "
                         f"--probe {loaded.path}:KEY, or key the entries by quantizer name "
                         f"('{s.name or 'quantizer'}')")
    if not out:
        listed = ", ".join(f"{k} {_shape_text(z)}" for k, z in list(z_all.items())[:8])
        raise _no_fit(f"probe {path} has entries {listed} and none names a quantizer or fits one by shape", states)
    return out


def _dict_entry(z: torch.Tensor, s: QuantizerState) -> torch.Tensor | None:
    """A named probe entry in code space: projected when it has the raw input dim, as is when it has the code-space dim."""
    cl = s.library in CHANNELS_LAST_LIBRARIES
    raw, code = expected_input_dim(s), code_space_dim(s)
    # A later stage of a group-level projection takes the residual in the projected space.
    later_stage = s.stage not in (None, 0)
    order = ((code, False), (raw, True)) if later_stage else ((raw, True), (code, False))
    for c, project in order:
        x = _flatten(z, c, cl)
        if x is not None:
            return _project(s, x) if project else x
    return None


def _no_fit(head: str, states: list[QuantizerState]) -> ProbeError:
    expect = ", ".join(f"{s.name or 'quantizer'} ({expected_input_dim(s)})" for s in states
                       if s.stage in (None, 0))
    return ProbeError(f"{head}; quantizers expect: {expect or 'nothing'}")


def reachable_share(K: int, n: int) -> float:
    """Expected share of K codes hit by n uniform draws: 1 - (1 - 1/K)^n (~ 1 - exp(-n/K)).

    The most a probe of n vectors can show in use, whatever the codebook does: 98.2% at n = 4K,
    63% at n = K, ~n/K when n << K (implicit FSQ/LFQ codebooks are often far larger than a probe).
    """
    if K <= 1 or n <= 0:
        return 1.0 if K <= 1 else 0.0
    return -math.expm1(n * math.log1p(-1.0 / K))


def _usage(idx: torch.Tensor, K: int, prefix: str = "probe_") -> dict[str, float]:
    """perplexity / usage / entropy of hard assignments (unique codes, so huge implicit K is fine)."""
    _, counts = torch.unique(idx, return_counts=True)
    h = float(F.entropy(F.usage_distribution(counts)))
    usage = counts.numel() / K
    return {f"{prefix}perplexity": math.exp(h), f"{prefix}usage_fraction": usage,
            f"{prefix}dead_fraction": 1.0 - usage,
            f"{prefix}usage_expected": reachable_share(K, idx.numel()),
            f"{prefix}entropy_norm": h / math.log(K) if K > 1 else 1.0,
            f"{prefix}top1_share": float(counts.max()) / idx.numel()}


def gumbel_choices(logits: torch.Tensor, seed: int = G.SAMPLE_SEED) -> torch.Tensor:
    """The codes a Gumbel-softmax quantizer picks for `[n, K]` logits, as it does in eval mode.

    taming `GumbelQuantize` (and its ports) run `F.gumbel_softmax(logits, hard=True)` in eval too
    and take the argmax of the result: a code drawn from softmax(logits) (the argmax of logits +
    Gumbel noise; the temperature does not move an argmax). The plain argmax of the logits would
    hide every code that is likely but never the most likely. Seeded, so a report is repeatable.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(logits.shape, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return (logits.to(torch.float64) - torch.log(-torch.log(u))).argmax(-1)


def input_spread(x: torch.Tensor, cosine: bool = False) -> float | None:
    """How spread the quantizer inputs are: median_i |z_i - mean z| / median_i |z_i|.

    Scale-free (the inputs' own norm is the unit): ~0.3-1 for encoder outputs that carry
    information (measured 0.13-1.0 over the zoo's probes, offset data included), ~0 when the
    encoder maps every input to one point (a saturated sigmoid / tanh head: 2e-5 and 2e-10 in
    the zoo's index-collapse scenarios), whatever the codebook. Cosine quantizers compare
    directions, so their inputs are l2-normalised first. In float64 (the spread of a collapsed
    input is below float32's resolution of its norm). Inputs that are all exactly 0 have no spread
    (0); when more than half of them are 0, the RMS norm is the unit.

    Args:
        x: `[n, D]` finite inputs.
        cosine: compare l2-normalised inputs.

    Returns:
        the spread, or None for fewer than two inputs.
    """
    if x.shape[0] < 2:
        return None
    v = x.detach().to(torch.float64)
    if cosine:
        v = F.l2normalize(v)
    norms = torch.linalg.vector_norm(v, dim=-1)
    unit = float(norms.median())
    if unit <= 0:
        unit = float(norms.pow(2).mean().sqrt())
    if unit <= 0:
        return 0.0
    return float(torch.linalg.vector_norm(v - v.mean(0), dim=-1).median()) / unit


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]} if ds else {}


def probe_metrics(q: QuantizerState, z: torch.Tensor, *, projected: bool = False,
                  code_norm_ref: float | None = None) -> dict[str, float]:
    """The PROBE metrics (`metrics.names.PROBE`) of one quantizer on its input vectors.

    Inputs are projected with `project_in` (x @ W.T + b) unless `projected`, split into
    `input_heads` slices of `dim`, and assigned with the quantizer's metric (cosine: both sides
    l2-normalised). Non-finite rows are counted (`probe_nonfinite`, elements) and dropped.

    - always: probe_tokens, probe_nonfinite; and with finite rows, z_norm_median (norm of the
      projected head slices) and z_spread (`input_spread` of the head slices; Gumbel: of the
      hidden features).
    - Gumbel with its logits layer (`extra["gumbel_logits"]`): the usage names of the codes it
      would pick (`gumbel_choices`: drawn from softmax(logits), as in eval mode).
    - codebook quantizers: probe_perplexity, probe_usage_fraction, probe_dead_fraction,
      probe_usage_expected, probe_entropy_norm, probe_top1_share (per codebook, averaged over heads with separate
      codebooks; pooled over heads sharing one), code_norm_median, scale_ratio =
      z_norm_median / code_norm_median, nearest_dist_median, nearest_to_intercode =
      nearest_dist_median / intercode_dist_median, quant_error_rel = median |z - e_k| / |z|
      (cosine: on the normalised vectors, what the lookup compares).
    - FSQ with levels: the implicit-code usage names, fsq_level_usage_min, fsq_saturation.
    - LFQ: the implicit-code usage names (when dim <= 62), lfq_bit_balance_min.

    Args:
        q: the quantizer.
        z: `[n, C]` inputs (C = expected_input_dim(q), or the code-space dim when `projected`).
        projected: `z` is already in code space (what `probe_inputs` returns).
        code_norm_ref: the codebook's reference norm (`codebook_metrics`' code_norm_median,
            taken over live codes when counts are stored); the scale ratio is taken against it.

    Returns:
        metric name -> finite float.
    """
    z = z.detach().to(torch.float32).reshape(-1, z.shape[-1])
    out: dict[str, float] = {"probe_nonfinite": float((~torch.isfinite(z)).sum())}
    x = z if projected else _project(q, z)
    x = x[torch.isfinite(x).all(-1)]
    if x.numel():  # of the code-space inputs, as live
        out["z_saturated"] = float(MD.saturated_share(x))
    out["probe_tokens"] = float(x.shape[0])
    if q.kind == "gumbel":
        # Gumbel quantizers choose from hidden features h that are not in the codes' space:
        # usage from the logits layer when known; no scale / distance metrics.
        if (spread := input_spread(x)) is not None:
            out["z_spread"] = spread
        logits = q.extra.get("gumbel_logits")
        if logits is not None and x.shape[0] and x.shape[1] == logits[0].shape[1]:
            out.update(_usage(gumbel_choices(x @ logits[0].T + logits[1]), q.codebook_size))
        return out
    h, D = q.input_heads, q.dim
    if x.shape[0] == 0 or x.shape[1] != h * D:
        return out
    heads = x.reshape(-1, h, D)
    out["z_norm_median"] = float(F.row_norms(heads).median())
    if (spread := input_spread(heads.reshape(-1, D), q.metric == "cosine")) is not None:
        out["z_spread"] = spread

    if q.kind == "fsq" and q.levels:
        flat = heads.reshape(-1, D)
        sym = bool(q.extra.get("preserve_symmetry", False)) or 2 in q.levels
        lv = F.fsq_level_indices(flat, q.levels, preserve_symmetry=sym)
        L = torch.tensor(q.levels)
        used = torch.tensor([lv[:, d].unique().numel() for d in range(D)], dtype=torch.float64)
        out["fsq_level_usage_min"] = float((used / L).min())
        out["fsq_saturation"] = float(((lv == 0) | (lv == L - 1)).double().mean())
        out.update(_usage(F.fsq_indices(lv, q.levels), q.codebook_size))
        return out
    if q.kind == "lfq":
        bits, idx = F.lfq_indices(heads.reshape(-1, D))
        p = bits.double().mean(0)
        out["lfq_bit_balance_min"] = float((2 * torch.minimum(p, 1 - p)).min())
        if D <= 62:
            out.update(_usage(idx, q.codebook_size))
        return out
    if q.codebook is None:
        return out

    idx, dist, _ = _quantize(q, x)
    cb = F.as_hkd(q.codebook.detach())
    K = int(cb.shape[1])
    if cb.shape[0] == 1:
        out.update(_usage(idx.reshape(-1), K))
    else:
        out.update(_mean_dicts([_usage(idx[:, i], K) for i in range(h)]))
    if code_norm_ref is not None and code_norm_ref > 0:
        # The codebook metrics' reference (median over live codes when counts are stored).
        out["scale_ratio"] = out["z_norm_median"] / code_norm_ref
    else:
        code_norms = F.row_norms(cb)
        code_norms = code_norms[torch.isfinite(code_norms) & (code_norms > 0)]
        if code_norms.numel():
            out["code_norm_median"] = float(code_norms.median())
            out["scale_ratio"] = out["z_norm_median"] / out["code_norm_median"]
    out["nearest_dist_median"] = float(dist.median())
    meds = []
    for i in range(cb.shape[0]):
        # Finite rows from the norms (a row's norm is finite iff its elements are), sampled
        # before they are gathered: the rows median_pairwise_distance would sample from
        # cb[i][finite], without copying the table or normalising rows it never uses.
        e, _ = G.sample_masked_rows(cb[i], torch.isfinite(F.row_norms(cb[i])), PAIRWISE_MAX_CODES)
        if q.metric == "cosine":
            e = F.l2normalize(e.to(torch.float32))
        meds.append(G.median_pairwise_distance(e, None))
    meds = [m for m in meds if math.isfinite(m)]
    if meds and sum(meds) > 0:
        out["nearest_to_intercode"] = out["nearest_dist_median"] / (sum(meds) / len(meds))
    zn = F.row_norms(F.l2normalize(heads) if q.metric == "cosine" else heads)
    rel = dist / zn
    rel = rel[torch.isfinite(rel)]
    if rel.numel():
        out["quant_error_rel"] = float(rel.median())
    return {k: v for k, v in out.items() if math.isfinite(v)}


__all__ = ["CHANNELS_LAST_LIBRARIES", "WRAPPER_KEYS", "LoadedProbe", "Probe", "code_space_dim",
           "expected_input_dim", "gumbel_choices", "input_spread", "load_probe", "match_by_shape",
           "probe_inputs", "probe_metrics", "reachable_share", "read_probe"]
