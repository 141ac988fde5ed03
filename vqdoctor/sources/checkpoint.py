"""The checkpoint source: read -> discover -> measure, for one checkpoint or several of one run.

Only the quantizers' tensors are read (memory-mapped); with two or more checkpoints also a
bounded prefix of the encoder and decoder weights, to compare them (`metrics.params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vqdoctor.checkpoint import open_checkpoint
from vqdoctor.metrics.codebook import codebook_metrics, usage_histogram
from vqdoctor.metrics.drift import drift_metrics, unchanged_rows
from vqdoctor.metrics.params import param_drift
from vqdoctor.metrics.probe import probe_inputs, probe_metrics, read_probe
from vqdoctor.quantizers import discover
from vqdoctor.quantizers.base import QuantizerState
from vqdoctor.results.model import QuantizerReport, QuantizerSeries, ReportSeries
from vqdoctor.results.series import head_usage_from_counts, norm_histogram, rank_frequency
from vqdoctor.rules.base import Evidence, QuantizerEvidence
from vqdoctor.sources import Observation


def evidence_from_states(states: list[QuantizerState], metrics: dict[str, dict[str, float]]) -> Evidence:
    """Evidence for the rules from discovered quantizers and their measured metrics."""
    qs = [QuantizerEvidence(name=s.name, kind=s.kind, library=s.library,
                            codebook_size=s.codebook_size, dim=s.dim, heads=s.heads,
                            group=s.group, stage=s.stage, metric=s.metric, ema_rule=s.ema_rule,
                            metrics=metrics[s.name], notes=list(s.notes)) for s in states]
    return Evidence(source_kind="checkpoint", quantizers=qs)


def _never_selected(series: list[QuantizerState | None]) -> torch.Tensor | None:
    """Rows of a gradient-trained codebook without counts that kept their bits from the first
    checkpoint to the last (never selected in between), for its duplicates; else None."""
    got = [x for x in series if x is not None and x.codebook is not None]
    if len(got) < 2 or got[-1].kind not in ("vq", "gumbel") or got[-1].cluster_size is not None:
        return None
    return unchanged_rows(got[0].codebook, got[-1].codebook)


def observe_checkpoints(
    paths: Sequence[str | Path],
    *,
    probe: str | Path | None = None,
    quantizers: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    trust_checkpoint: bool = False,
    max_memory: int | str | None = None,
) -> Observation:
    """What one checkpoint, or several taken from one run (oldest first), shows.

    Args:
        paths: checkpoint files or folders. With several, the last is diagnosed and the earlier
            ones give drift (codebook movement, dead-code growth, encoder/decoder weights).
        probe: tensor file of encoder outputs (the quantizer's input), or a dict name -> tensor.
        quantizers: key prefixes naming the quantizers to use, when discovery is wrong or ambiguous.
        levels: FSQ levels, for FSQ quantizers (nothing of them is stored).
        trust_checkpoint: allow full unpickling (runs code from the file; only for files you trust).
        max_memory: memory budget for reading any one input tensor (bytes, or "4GiB"; default
            1 GiB); a probe over it is sampled, a checkpoint tensor refused with one line.

    Raises:
        VQDoctorError: a file cannot be read, holds no quantizer, or the probe fits none.
    """
    paths = [str(p) for p in paths]
    history: list[list[QuantizerState]] = []
    sources = []
    for p in paths:
        src = open_checkpoint(p, trust=trust_checkpoint, max_memory=max_memory)
        sources.append(src)
        history.append(discover(src, only=quantizers, levels=levels))
    states = history[-1]

    z_by_name: dict[str, torch.Tensor] = {}
    probe_used: dict[str, str] = {}
    if probe is not None:
        # Raises ProbeError (naming the probe's shape and each quantizer's dim) when nothing fits.
        loaded = read_probe(str(probe), max_memory=max_memory)
        z_by_name = probe_inputs(loaded, states, path=str(probe))
        probe_used = loaded.used

    metrics: dict[str, dict[str, float]] = {}
    for s in states:
        series = [next((x for x in h if x.name == s.name), None) for h in history] if len(history) > 1 else []
        m = codebook_metrics(s, never_selected=_never_selected(series))
        if s.name in z_by_name:
            m.update(probe_metrics(s, z_by_name[s.name], projected=True,
                                   code_norm_ref=m.get("code_norm_median")))
        if series:
            m.update(drift_metrics([x for x in series if x is not None]))
        metrics[s.name] = m

    ev = evidence_from_states(states, metrics)
    if len(sources) > 1:  # did the encoder and decoder move between the checkpoints?
        prefixes = {s.name for s in states} | {s.group for s in states if s.group}
        ev.run.update(param_drift(sources[0], sources[-1], prefixes))
    reports = [QuantizerReport(info=s.describe(), metrics=metrics[s.name], histogram=usage_histogram(s),
                               notes=list(s.notes)) for s in states]
    last = sources[-1]
    source: dict[str, Any] = {"kind": "checkpoint", "paths": paths, "torch": torch.__version__,
                              "safe_load": all(x.safe_load for x in sources), "format": last.format,
                              "container": last.container}
    if probe is not None:
        source["probe"] = str(probe)
        if probe_used:  # which entry of a dict probe each quantizer was given
            source["probe_entries"] = probe_used
    return Observation(evidence=ev, quantizers=reports, source=source, series=checkpoint_series(states))


def checkpoint_series(states: list[QuantizerState]) -> ReportSeries:
    """Chart data of checkpoint quantizers: rank-frequency and per-head usage from the stored
    counts, the code-norm histogram from the codebook."""
    out: dict[str, QuantizerSeries] = {}
    for s in states:
        rf: dict[str, Any] = {}
        hu: dict[str, Any] = {}
        norms: dict[str, Any] = {}
        try:
            with torch.no_grad():
                if s.cluster_size is not None:
                    c = s.cluster_size.detach().float().cpu()
                    c = c.reshape(-1, c.shape[-1]).numpy()
                    rf = rank_frequency(c)
                    if c.shape[0] > 1:
                        hu = {"steps": [0], "heads": int(c.shape[0]), "usage": [head_usage_from_counts(c)]}
                if s.codebook is not None:
                    norms = norm_histogram(torch.linalg.vector_norm(s.codebook.detach().float(), dim=-1).numpy())
        except Exception:  # charts are extras: a quantizer they cannot read is drawn without them
            pass
        out[s.name] = QuantizerSeries(rank_frequency=rf, code_norms=norms, head_usage=hu)
    return ReportSeries(quantizers=out)
