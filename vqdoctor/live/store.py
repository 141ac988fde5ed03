"""The run store: a directory that a watched training appends to and reports are computed from.

Layout of a run directory::

    RUN_DIR/
      meta.json        # run metadata, rewritten atomically (temp file + rename); rank 0 writes it
      rank0.jsonl      # append-only record stream of rank 0 (RANK from the environment, default 0)
      rank1.jsonl      # ... one stream per data-parallel rank

`meta.json` (schema_version 1)::

    {"schema_version": 1, "tool": {"name": "vqdoctor", "version": "0.1.0"},
     "created": "2025-01-01T12:00:00+00:00", "ended": null | "...",
     "status": "running" | "finished" | "failed",
     "command": null (Python API) | ["python", "train.py", ...] (launcher),
     "cwd": "/path", "torch": "2.13.0", "world_size": 1,
     "config": {"flush_every": 50, "stats_every": 10, "window": null | int, "hist_every": 50,
                "fsync": false, "start_step": 0},
     "quantizers": [<QuantizerState.describe() dicts>], "steps": int | null}

Each `rankR.jsonl` line is one JSON object with a type tag `t`. Non-finite floats are written
as `NaN` / `Infinity` / `-Infinity` (Python's JSON extension); a metric that was not measured
at a step is absent, never null. Records, in the order they appear:

- `{"t": "start", "rank": R, "world_size": W, "pid": int, "time": iso, "step": first step,
   "quantizers": [describe dicts], "config": {...}}` -- once per session. A directory reused by a
   later session gets a new `start`; readers keep only the records after the last `start` of
   each rank file.
- `{"t": "step", "step": s, "q": name, <metric>: value, ...}` -- one per quantizer per step that
  quantized any token: `tokens`, `perplexity`, `perplexity_fraction`, `entropy_norm`,
  `top1_share`, `usage_window`, `usage_fraction`, `dead_fraction`, `entropy_norm_window`,
  `perplexity_window`, `window_steps`; on cadence steps (every `stats_every`) also
  `z_norm_median`, `code_norm_median`, `scale_ratio`, `quant_error_rel`, `nonfinite_input`,
  `nonfinite_output`, `nonfinite_buffers`, `codebook_rms_change`, `codes_replaced`,
  `count_total`, `ema_count_sum_to_tokens`, `st_grad_ratio`, `st_grad_cos`,
  `grad_norm_codebook`, `codebook_in_optimizer` (where they apply); `eval_mutation` on steps
  where a forward in eval mode / under no_grad changed the quantizer's buffers; FSQ/LFQ
  `fsq_level_usage_min`, `fsq_saturation`, `lfq_bit_balance_min` on the last step of a flush
  interval. Names and meanings: `vqdoctor.metrics.names`.
- `{"t": "run", "step": s, "loss": float, "grad_norm_encoder": ..., "grad_norm_decoder": ...,
   "nonfinite_grad": ...}` -- run-wide values of one step (loss when given to `doctor.step`,
   gradient norms on cadence steps).
- `{"t": "hist", "step": last step covered, "q": name, "first_step": s0, "steps": n,
   "window": W, "heads": H, "counts": [H*K ints]}` -- code counts summed over the steps
   s0..step (one flush interval, or `hist_every` steps). Summing them across ranks gives the
   global usage exactly (a report's windowed metrics come from these).
- `{"t": "fp", "step": s, "q": name, "rows": [row indices], "fingerprint": [floats]}` -- when
  world size > 1, at each flush: the codebook rows `rows` (flattened, heads first) followed by
  16 sums over fixed contiguous blocks of the codebook, for comparing codebooks across ranks.
- `{"t": "codebook", "step": s, "q": name, <CODEBOOK metric>: value, ...}` -- at the end of the
  session: checkpoint-style metrics of the live codebook (`metrics.codebook.codebook_metrics`),
  and `code_norm_hist` ({"edges": [...], "counts": [...]}: the code-vector norms, for the report's
  histogram).
- `{"t": "event", "step": s, "level": "info" | "warning" | "error", "message": str, "q": name?}`
  -- something the user should know (a probe that raised and was disabled, ...).
- `{"t": "end", "step": s, "status": "finished" | "failed"}` -- the session closed.

Records are written in batches at each flush (one `write`, then `flush`, `os.fsync` when the
config asks), so a killed process loses at most the records of its last unflushed interval,
and a torn last line is skipped by the readers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vqdoctor.errors import RunStoreError

SCHEMA_VERSION = 1
META = "meta.json"
# An `fp` record's fingerprint: sampled codebook rows, then this many block sums of the table.
FP_BLOCKS = 16
# Records kept in memory when the run directory cannot be written (oldest dropped beyond this).
MEMORY_LIMIT = 200_000


class WatchWarning(RuntimeWarning):
    """vqdoctor could not do part of its job during a training (the training itself goes on)."""


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(v: Any) -> Any:
    """JSON-ready value: numpy scalars to Python, tuples to lists (NaN/Inf kept as floats)."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return _clean(v.item())
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    return str(v)


def _json_default(v: Any) -> Any:
    """json.dumps fallback: numpy / torch scalars and arrays to Python values, else str."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` via a temp file in the same directory and `os.replace`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".meta-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass
class RunStore:
    """Writer of one rank's stream (and, on rank 0, of `meta.json`).

    Never raises on I/O: the first failure warns once (`WatchWarning`), and from then on records
    are kept in memory (`memory`, bounded) so an in-process report still works.

    Attributes:
        run_dir: the run directory.
        rank: this process's rank.
        fsync: call os.fsync after each batch.
        meta: the metadata dict (rank 0 rewrites it on `write_meta`).
        memory: records kept in memory after a write failure (all records when `keep` is True).
        failed: True once the directory could not be written.
    """

    run_dir: Path
    rank: int = 0
    fsync: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    keep: bool = False
    memory: list[dict[str, Any]] = field(default_factory=list)
    failed: bool = False
    _file: Any = None

    @property
    def stream_path(self) -> Path:
        """Path of this rank's JSONL stream."""
        return Path(self.run_dir) / f"rank{self.rank}.jsonl"

    def open(self) -> None:
        """Create the directory and open the stream for appending (failures warn, never raise)."""
        try:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(self.stream_path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if not self.failed:
            self.failed = True
            warnings.warn(f"vqdoctor: cannot write run directory {self.run_dir} ({e}); "
                          f"recording continues in memory, training is not affected",
                          WatchWarning, stacklevel=3)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (one batch: one write, one flush).

        Records should hold JSON-native values (the recorder builds them so); anything else is
        converted on the way out (`_json_default`).
        """
        records = list(records)
        if not records:
            return
        if self.keep or self.failed:
            self.memory.extend(records)
            if len(self.memory) > MEMORY_LIMIT:
                del self.memory[: len(self.memory) - MEMORY_LIMIT]
        if self.failed or self._file is None:
            if not self.failed:
                self._fail(OSError("stream not open"))
                self.memory.extend(records)
            return
        try:
            text = "".join(json.dumps(r, separators=(",", ":"), default=_json_default) + "\n" for r in records)
            self._file.write(text)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except (OSError, ValueError) as e:
            self._fail(e)
            self.memory.extend(records)

    def write_meta(self) -> None:
        """Rewrite meta.json atomically (rank 0 only; failures warn once)."""
        if self.rank != 0 or self.failed:
            return
        try:
            write_json_atomic(Path(self.run_dir) / META, self.meta)
        except OSError as e:
            self._fail(e)

    def close(self) -> None:
        """Close the stream."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


# ----------------------------------------------------------------------------------- readers


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """One record, or None for a blank, torn or unparsable line (never an error)."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        rec = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "t" in rec else None


class StoreTail:
    """Incremental reader of a run directory that is being written.

    The store's one reader: `load_records` is a single `poll`, the live panel and the Doctor's
    alerts poll repeatedly. Each `poll` reads only the bytes appended since the last one; a line
    is parsed once it is complete (a torn or unparsable line is skipped, never an error), and a
    `start` record begins a new session of its rank.

    Args:
        run_dir: the run directory.
        keep_steps: keep only the records of the last `keep_steps` steps of each rank (and its
            `start` record), so that what is kept, and the rules run over it, does not grow with
            the run's length (live alerts); None keeps everything.
        strict: raise `RunStoreError` when a stream cannot be read (else it is skipped this time).

    Attributes:
        run_dir: the run directory.
        meta: the latest meta.json ({} while absent).
        streams: rank -> records of its current session.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, keep_steps: int | None = None,
                 strict: bool = False):
        self.run_dir = Path(run_dir)
        self.keep_steps = keep_steps
        self.strict = strict
        self.trimmed = False  # some records were dropped (keep_steps): not the whole run
        self.meta: dict[str, Any] = {}
        self.streams: dict[int, list[dict[str, Any]]] = {}
        self._pos: dict[int, int] = {}
        self._rest: dict[int, bytes] = {}
        self._meta_mtime: float | None = None

    def poll(self, final: bool = False) -> list[tuple[int, dict[str, Any]]]:
        """Read what was appended since the last call.

        Args:
            final: also parse a last line without its newline (a one-shot read of a finished or
                killed run; a live tail waits for the newline).

        Returns:
            The new records as (rank, record), in file order per rank.
        """
        new: list[tuple[int, dict[str, Any]]] = []
        self._poll_meta()
        try:
            paths = stream_paths(self.run_dir)
        except OSError as e:
            if self.strict:
                raise RunStoreError(f"cannot list the run directory: {e.strerror or e}",
                                    path=str(self.run_dir)) from None
            return new
        for rank, path in paths.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            pos = self._pos.get(rank, 0)
            if size < pos:  # replaced or truncated: read it again from the start
                pos = 0
                self._rest[rank] = b""
                self.streams[rank] = []
            if size == pos:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read(size - pos)
            except OSError as e:
                if self.strict:
                    raise RunStoreError(f"cannot read {path.name}: {e.strerror or e}",
                                        path=str(self.run_dir)) from None
                continue
            self._pos[rank] = pos + len(data)
            lines = (self._rest.get(rank, b"") + data).split(b"\n")
            self._rest[rank] = b"" if final else lines.pop()
            recs = self.streams.setdefault(rank, [])
            for raw in lines:
                rec = _parse_line(raw)
                if rec is None:
                    continue
                if rec["t"] == "start":
                    recs.clear()
                recs.append(rec)
                new.append((rank, rec))
            if self.keep_steps is not None:
                self._trim(recs)
        return new

    def _trim(self, recs: list[dict[str, Any]]) -> None:
        """Drop step-dated records older than `keep_steps` steps before the newest one."""
        last = max((r["step"] for r in reversed(recs[-64:]) if isinstance(r.get("step"), int)), default=None)
        if last is None or len(recs) < 2:
            return
        cut = last - int(self.keep_steps or 0)
        old = recs[1] if recs[0].get("t") == "start" else recs[0]
        if not isinstance(old.get("step"), int) or old["step"] >= cut:
            return
        head = recs[:1] if recs[0].get("t") == "start" else []
        self.trimmed = True
        recs[:] = head + [r for r in recs[len(head):]
                          if not isinstance(r.get("step"), int) or r["step"] >= cut or r.get("t") == "codebook"]

    def state(self, *, on_disk: bool = False) -> tuple:
        """(meta.json mtime, bytes per rank): what was read, or what is on disk now."""
        if not on_disk:
            return (self._meta_mtime, tuple(sorted((r, n) for r, n in self._pos.items() if n)))
        try:
            mtime: float | None = (self.run_dir / "meta.json").stat().st_mtime_ns
            sizes = tuple(sorted((r, n) for r, p in stream_paths(self.run_dir).items()
                                 if (n := p.stat().st_size)))
        except OSError:
            return (None, ())
        return (mtime, sizes)

    def _poll_meta(self) -> None:
        try:
            mtime = (self.run_dir / "meta.json").stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._meta_mtime:
            meta = read_meta(self.run_dir)
            if meta:
                self.meta = meta
                self._meta_mtime = mtime



def read_meta(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a run directory, or {} when absent or unreadable (streams suffice)."""
    p = Path(run_dir) / META
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def stream_paths(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """rank -> stream path, for every `rank<R>.jsonl` in the directory."""
    out: dict[int, Path] = {}
    for p in Path(run_dir).glob("rank*.jsonl"):
        tail = p.stem[4:]
        # regular files only: a device or FIFO under that name could be read forever
        if tail.isdigit() and p.is_file():
            out[int(tail)] = p
    return dict(sorted(out.items()))


def load_records(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[int, list[dict[str, Any]]]]:
    """Metadata and every rank's records of a run directory.

    Readable while the run is being written and after it was killed.

    Raises:
        RunStoreError: the directory is missing, not a directory, unreadable, or holds no run.
    """
    d = Path(run_dir)
    if not d.exists():
        raise RunStoreError("run directory does not exist", path=str(run_dir))
    if not d.is_dir():
        raise RunStoreError("not a run directory (a file)", path=str(run_dir),
                            hint="pass the folder that holds meta.json and rank*.jsonl")
    try:
        paths = stream_paths(d)
    except OSError as e:
        raise RunStoreError(f"cannot list the run directory: {e.strerror or e}", path=str(run_dir)) from None
    meta = read_meta(d)
    if not paths and not meta:
        raise RunStoreError("no vqdoctor run here (no meta.json, no rank*.jsonl)", path=str(run_dir))
    tail = StoreTail(d, strict=True)
    tail.poll(final=True)
    return meta or tail.meta, {r: tail.streams.get(r, []) for r in paths}


def writer_gone(run_dir: Path, quiet_s: float = 60.0) -> Any:
    """A `stop` test for a run whose meta still says "running": true once nothing was appended
    for `quiet_s` seconds and no process that started a session is alive on this machine."""
    state = {"size": -1, "since": time.monotonic()}

    def gone() -> bool:
        try:
            size = sum(p.stat().st_size for p in stream_paths(run_dir).values())
        except OSError:
            return False
        now = time.monotonic()
        if size != state["size"]:
            state["size"], state["since"] = size, now
            return False
        if now - state["since"] < quiet_s:
            return False
        _, streams = load_records(run_dir)
        pids = [r.get("pid") for recs in streams.values() for r in recs[:1] if r.get("t") == "start"]
        for pid in pids:
            if isinstance(pid, int):
                try:
                    os.kill(pid, 0)
                    return False
                except PermissionError:
                    return False
                except OSError:
                    continue
        return True

    return gone


def records_frame(streams: dict[int, list[dict[str, Any]]]):
    """One row per rank x step x quantizer (run-wide rows have quantizer ""), metric columns.

    A quantizer that is the watched model itself is also named "": `record` ("step" for a
    quantizer's row, "run" for the run-wide one) keeps the two apart.

    Args:
        streams: rank -> records (as from `load_records`).

    Returns:
        pandas.DataFrame with columns rank, step, quantizer, record, then metric names (float).
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for rank, recs in streams.items():
        for r in recs:
            t = r.get("t")
            if t not in ("step", "run") or "step" not in r:
                continue
            row = {k: v for k, v in r.items() if k not in ("t", "q")}
            row["rank"] = rank
            row["quantizer"] = r.get("q", "") if t == "step" else ""
            row["record"] = t
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["rank", "step", "quantizer", "record"])
    df = pd.DataFrame(rows)
    # a step's quantizer record and its run record of one rank are one row each; merge duplicates
    # (several flushes never repeat a step, but be tolerant)
    df = df.groupby(["rank", "step", "quantizer", "record"], sort=True, as_index=False).last()
    metric_cols = [c for c in df.columns if c not in ("rank", "step", "quantizer", "record")]
    for c in metric_cols:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["rank"] = df["rank"].astype(int)
    df["step"] = df["step"].astype(int)
    return df[["rank", "step", "quantizer", "record", *sorted(metric_cols)]].reset_index(drop=True)


def load_run(run_dir: str | os.PathLike[str]):
    """The per-step metrics of a recorded run as a pandas DataFrame.

    One row per rank x step x quantizer with one float column per metric name
    (`vqdoctor.metrics.names`); run-wide values (loss, gradient norms) are rows whose
    `quantizer` is "". A metric not measured at a step is NaN.

    Args:
        run_dir: the run directory.

    Raises:
        RunStoreError: the directory is missing or unreadable, or holds no run.
    """
    _, streams = load_records(run_dir)
    return records_frame(streams)


def finite_or_none(x: float) -> float | None:
    """x when finite, else None (for JSON-native summaries)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
