"""The one diagnosis pipeline: a source's observation -> rules -> the ranked `Report`.

    sources.checkpoint.observe_checkpoints(paths)  --\\
                                                      >-- diagnose(observation) -> Report
    sources.run.observe_run(meta, streams)         --/

`inspect_checkpoints`, `report_run` and `report_target` are the entry points the API, the CLI,
the watch and the gate call; they read their input through a source and end in `diagnose`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vqdoctor import __version__
from vqdoctor.results.model import Report
from vqdoctor.results.series import with_series
from vqdoctor.rules import run_rules
from vqdoctor.sources import Observation


def diagnose(observation: Observation, thresholds: dict[str, dict[str, Any]] | None = None) -> Report:
    """The ranked report of what a source observed.

    Args:
        observation: a checkpoint's or a run's observation (`vqdoctor.sources`).
        thresholds: per-rule threshold overrides, e.g. {"dead-codes": {"warn_fraction": 0.3}}.

    Returns:
        The report: ranked findings (root cause first), the quantizers with their metrics, and
        the checks that could not run (`errors`).
    """
    findings, errors = run_rules(observation.evidence, thresholds)
    report = Report(source=observation.source, quantizers=observation.quantizers, findings=findings,
                    errors=[*observation.errors, *errors], tool_version=__version__)
    return with_series(report, observation.series)


def inspect_checkpoints(
    paths: Sequence[str | Path],
    *,
    probe: str | Path | None = None,
    quantizers: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    trust_checkpoint: bool = False,
    thresholds: dict[str, dict[str, Any]] | None = None,
    max_memory: int | str | None = None,
) -> Report:
    """Diagnose one checkpoint, or several taken from one run (oldest first).

    Args:
        paths: checkpoint files or folders. With several, the last is diagnosed and the earlier
            ones give drift (codebook movement, dead-code growth).
        probe: tensor file of encoder outputs (the quantizer's input), or a dict name -> tensor.
        quantizers: key prefixes naming the quantizers to use, when discovery is wrong or ambiguous.
        levels: FSQ levels, for FSQ quantizers (nothing of them is stored).
        trust_checkpoint: allow full unpickling (runs code from the file; only for files you trust).
        thresholds: per-rule threshold overrides.
        max_memory: memory budget for reading any one input tensor (bytes, or "4GiB"; default
            1 GiB); a probe over it is sampled, a checkpoint tensor refused with one line.

    Returns:
        The ranked report.
    """
    from vqdoctor.sources.checkpoint import observe_checkpoints

    obs = observe_checkpoints(paths, probe=probe, quantizers=quantizers, levels=levels,
                              trust_checkpoint=trust_checkpoint, max_memory=max_memory)
    return diagnose(obs, thresholds)


def report_run(run_dir: str | os.PathLike[str], thresholds: dict[str, dict[str, Any]] | None = None,
               *, window: int | None = None) -> Report:
    """Ranked diagnosis of a recorded run, from its run directory alone.

    Works on a run that is still being written and on one whose process was killed.

    Args:
        run_dir: the run directory.
        thresholds: per-rule threshold overrides, e.g. {"dead-codes": {"warn_fraction": 0.3}}.
        window: report the windowed usage over the last `window` steps (the gate's `--window`).

    Raises:
        RunStoreError: the directory is missing, unreadable or holds no run.
    """
    from vqdoctor.live.store import load_records
    from vqdoctor.sources.run import observe_run

    meta, streams = load_records(run_dir)
    return diagnose(observe_run(meta, streams, [str(run_dir)], window=window), thresholds)


def report_records(meta: dict[str, Any], streams: dict[int, list[dict[str, Any]]], paths: Sequence[str],
                   thresholds: dict[str, dict[str, Any]] | None = None) -> Report:
    """The ranked report of a run's records already read (a `live.store.StoreTail`, the Doctor)."""
    from vqdoctor.sources.run import observe_run

    return diagnose(observe_run(meta, streams, list(paths)), thresholds)


def is_run_dir(path: str | Path) -> bool:
    """True for a directory recorded by `vqdoctor.watch` (it holds meta.json or rank*.jsonl)."""
    p = Path(path)
    return p.is_dir() and ((p / "meta.json").is_file() or any(p.glob("rank*.jsonl")))


def report_target(
    paths: Sequence[str | Path],
    *,
    probe: str | Path | None = None,
    trust_checkpoint: bool = False,
    thresholds: dict[str, dict[str, Any]] | None = None,
    window: int | None = None,
    max_memory: int | str | None = None,
) -> Report:
    """The report of a run directory, or of checkpoint(s) (several: one run, oldest first).

    Raises:
        InputError: several targets that include a run directory, or a probe given for a run.
        VQDoctorError: the target cannot be analysed.
    """
    from vqdoctor.errors import InputError

    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("nothing to analyse: give a run directory or checkpoint file(s)")
    if any(is_run_dir(p) for p in paths):
        if len(paths) > 1:
            raise InputError("one run directory at a time (or checkpoint files, oldest first)",
                             path=str(paths[0]))
        if probe is not None:
            raise InputError("--probe applies to checkpoints; a run directory records usage itself",
                             path=str(paths[0]))
        return report_run(paths[0], thresholds, window=window)
    return inspect_checkpoints(paths, probe=probe, trust_checkpoint=trust_checkpoint, thresholds=thresholds,
                               max_memory=max_memory)
