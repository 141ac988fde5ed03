"""Sync-free device twins of the host metrics, for the live watch's cadence statistics.

Each function here computes the same quantity as its host counterpart (named in its docstring),
on the tensors' own device, without reading a value on the host (`.item()`, `.cpu()`, `bool(t)`)
and without data-dependent shapes (`nonzero`, boolean-mask indexing): every result is a 0-d
float32 tensor that stays on the device until the watch's flush. The thresholds are the host's
(`metrics.constants`).
"""

from __future__ import annotations

import torch

from vqdoctor.metrics.constants import BLOWUP_FACTOR, NEAR_ZERO_REF, SATURATION_REL


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lower weighted median (`metrics.functional.weighted_median`); NaN when no weight is positive.

    The smallest v_i with sum_{v_j <= v_i} w_j >= sum_j w_j / 2; equal weights give the lower
    median (`torch.median`). Entries with a non-finite value or weight, or a weight <= 0, take no part.
    """
    v = values.reshape(-1).to(torch.float64)
    w = weights.reshape(-1).to(torch.float64)
    w = torch.where(torch.isfinite(v) & torch.isfinite(w) & (w > 0), w, torch.zeros_like(w))
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    order = torch.argsort(v)
    cum = torch.cumsum(w.index_select(0, order), 0)
    total = cum[-1:]
    i = torch.searchsorted(cum, total / 2).clamp_(max=v.numel() - 1)
    med = v.index_select(0, order.index_select(0, i)).reshape(())
    return torch.where(total.reshape(()) > 0, med, torch.full_like(med, float("nan"))).to(torch.float32)


def usage_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-code weight min(N_i, n/K) of each head (`metrics.codebook.usage_weights`), float64."""
    c = torch.nan_to_num(counts.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    return torch.minimum(c, c.sum(-1, keepdim=True) / max(int(c.shape[-1]), 1))


def code_norm_median(cb: torch.Tensor, counts: torch.Tensor | None,
                     norms: torch.Tensor | None = None) -> torch.Tensor:
    """`code_norm_median` as the checkpoint metrics define it (`metrics.codebook._geometry`).

    Finite, non-zero rows; with EMA counts each code weighs min(N_i, n/K) of its head (the scale
    of the codes in use), else all weigh the same.
    """
    if norms is None:
        norms = torch.linalg.vector_norm(cb.float(), dim=-1)             # [H, K]
    ok = torch.isfinite(norms) & (norms > 0)
    if counts is not None and counts.shape == norms.shape:
        w = usage_weights(counts)
    else:
        w = torch.ones_like(norms, dtype=torch.float64)
    return weighted_median(norms, torch.where(ok, w, torch.zeros_like(w)))


def input_spread(z: torch.Tensor, cosine: bool) -> torch.Tensor:
    """`z_spread` (`metrics.probe.input_spread`): median |z_i - mean z| / median |z_i| in float64.

    Cosine lookups: of l2-normalised rows. The RMS norm is the unit when the median norm is 0;
    all-zero inputs have spread 0.
    """
    v = z.detach().to(torch.float64)
    if cosine:
        v = torch.nn.functional.normalize(v, dim=-1)
    norms = torch.linalg.vector_norm(v, dim=-1)
    unit = norms.median()
    unit = torch.where(unit > 0, unit, norms.pow(2).mean().sqrt())
    dev = torch.linalg.vector_norm(v - v.mean(0), dim=-1).median()
    return torch.where(unit > 0, dev / torch.where(unit > 0, unit, torch.ones_like(unit)),
                       torch.zeros_like(unit)).to(torch.float32)


def saturated_share(x: torch.Tensor) -> torch.Tensor:
    """`z_saturated` (`metrics.probe`): the share of input components within 1% of the largest
    |component|, i.e. sitting at the bound of a saturated tanh / sigmoid head (~1 saturated,
    ~0 for encoder outputs that carry information); 0 for all-zero inputs."""
    a = x.detach().abs().float()
    top = a.amax() if a.numel() else a.new_zeros(())
    return torch.where(top > 0, (a >= SATURATION_REL * top).float().mean() if a.numel() else top,
                       torch.zeros_like(top))


def blowup(norms: torch.Tensor, code_med: torch.Tensor, z_med: torch.Tensor, nan: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest finite row norm, rows above BLOWUP_FACTOR x the reference), as `blowup_rows` counts.

    The reference is the median code norm, or the median input norm when that is larger: an EMA
    row is an average of the inputs assigned to it, so a row 100x beyond both the codes in use
    and the inputs is blown up, while codes that followed a growing encoder (the usage-weighted
    median can stay at the initial scale while most codes die) are not. NaN, NaN when the
    reference is not finite, <= 0, or below NEAR_ZERO_REF x the median of all non-zero finite
    rows (the codes in use and the inputs sit at ~0, so any ordinary row would look blown up).
    """
    ref = torch.where(torch.isfinite(z_med) & (z_med > code_med), z_med.to(code_med.dtype), code_med)
    fin = torch.isfinite(norms)
    all_med = torch.where(fin & (norms > 0), norms, nan).nanmedian()
    usable = torch.isfinite(ref) & (ref > 0) & (ref >= NEAR_ZERO_REF * all_med)
    top = torch.where(fin, norms, torch.zeros_like(norms)).amax()
    rows = (fin & (norms > BLOWUP_FACTOR * ref)).sum(dtype=torch.float32)
    return torch.where(usable, top, nan), torch.where(usable, rows, nan)
