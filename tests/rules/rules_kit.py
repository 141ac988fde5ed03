"""Builders for rule tests: evidence from real tensors (checkpoint mode) and step series (run mode).

Checkpoint evidence goes through vqdoctor's own metrics (`codebook_metrics`, `probe_metrics`),
so a rule test also checks that the names a rule reads are the names the metrics produce.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from vqdoctor.metrics.codebook import codebook_metrics
from vqdoctor.metrics.probe import probe_metrics
from vqdoctor.quantizers.base import QuantizerState
from vqdoctor.rules import Evidence, Finding, QuantizerEvidence, registry


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assign(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest-code indices (Euclidean)."""
    return torch.cdist(z, codebook).argmin(1)


def ema_step(codebook: torch.Tensor, z: torch.Tensor, *, decay: float = 0.99, eps: float = 1e-5,
             counts: torch.Tensor | None = None, sums: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA codebook update as libraries implement it (VQ-VAE / rosinality / encodec).

    Returns (codebook, counts, sums) after the step. With `counts=None` the counts start at zero
    and the sums at the codebook itself (rosinality / taming / zalando: `embed_avg = embed.clone()`).
    """
    K = codebook.shape[0]
    idx = assign(z, codebook)
    onehot_counts = torch.bincount(idx, minlength=K).float()
    batch_sums = torch.zeros_like(codebook).index_add_(0, idx, z)
    counts = torch.zeros(K) if counts is None else counts
    sums = codebook.clone() if sums is None else sums
    counts = decay * counts + (1 - decay) * onehot_counts
    sums = decay * sums + (1 - decay) * batch_sums
    n = counts.sum()
    smoothed = (counts + eps) / (n + K * eps) * n
    return sums / smoothed[:, None], counts, sums


def state(codebook: torch.Tensor | None, *, kind: str = "vq-ema", counts: torch.Tensor | None = None,
          sums: torch.Tensor | None = None, name: str = "quantizer", **kw: Any) -> QuantizerState:
    K, D = codebook.shape if codebook is not None else (counts.shape[-1], 1)
    return QuantizerState(name, kind, "generic", int(K), int(D),
                          codebook=None if codebook is None else codebook[None],
                          cluster_size=None if counts is None else counts[None],
                          embed_avg=None if sums is None else sums[None], **kw)


def measured(s: QuantizerState, probe: torch.Tensor | None = None,
             **extra: float) -> QuantizerEvidence:
    """QuantizerEvidence with vqdoctor's own checkpoint (and probe) metrics of `s`."""
    m = codebook_metrics(s)
    if probe is not None:
        m |= probe_metrics(s, probe, projected=True)
    m |= extra
    return QuantizerEvidence(name=s.name, kind=s.kind, library=s.library,
                             codebook_size=s.codebook_size, dim=s.dim, metric=s.metric,
                             group=s.group, stage=s.stage, metrics=m)


def qev(metrics: dict[str, float] | None = None, *, series: pd.DataFrame | None = None,
        kind: str = "vq-ema", K: int = 512, D: int = 64, name: str = "quantizer",
        metric: str = "euclidean", group: str | None = None) -> QuantizerEvidence:
    """QuantizerEvidence from given metric values and/or a step series."""
    return QuantizerEvidence(name=name, kind=kind, library="generic", codebook_size=K, dim=D,
                             metric=metric, group=group, metrics=dict(metrics or {}), series=series)


def frame(steps: list[int] | range | None = None, **cols: Any) -> pd.DataFrame:
    """A step series: columns of equal length, indexed by step (default 0, 1, 2, ...)."""
    n = len(next(iter(cols.values())))
    return pd.DataFrame({k: list(v) for k, v in cols.items()},
                        index=pd.Index(list(steps) if steps is not None else range(n), name="step"))


def checkpoint(*qs: QuantizerEvidence) -> Evidence:
    return Evidence(source_kind="checkpoint", quantizers=list(qs))


def run(*qs: QuantizerEvidence, run_series: pd.DataFrame | None = None, **scalars: float) -> Evidence:
    return Evidence(source_kind="run", quantizers=list(qs), run=dict(scalars), run_series=run_series)


def check(rule_id: str, ev: Evidence, **overrides: Any) -> list[Finding]:
    """Findings of one rule on `ev`, with threshold overrides."""
    return registry()[rule_id].run(ev, overrides or None)


def one(rule_id: str, ev: Evidence, **overrides: Any) -> Finding:
    """The single finding of one rule on `ev` (fails when there is not exactly one)."""
    found = check(rule_id, ev, **overrides)
    assert len(found) == 1, [f.message for f in found]
    return found[0]
