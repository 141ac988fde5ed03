"""Live watching of a training: `with vqdoctor.watch(model) as doctor: ...`.

```python
import vqdoctor
with vqdoctor.watch(model, run_dir="runs/vq") as doctor:   # finds the quantizers itself
    for batch in loader:
        loss = train_step(batch)
        doctor.step(loss=loss)          # optional where an optimizer step is seen
report = doctor.report()                # or vqdoctor.report("runs/vq") later, offline
df = vqdoctor.load_run("runs/vq")       # per-step metrics as a DataFrame
```

`vqdoctor.watch` is `watch` here. The rest of the package: `discovery` (finding quantizers),
`recorder` (hooks and the step clock) over `probe` / `arena` / `outputs` / `flush`, `store` (the
run directory and its one reader), `follow` (the live alerts of a run being recorded),
`launcher` (zero-code attach), `alerts`.

torch.compile: hooks run outside compiled graphs (`torch._dynamo.disable`, or the outermost
`OptimizedModule` of a compiled quantizer), so a compiled model graph-breaks around each
quantizer and trains normally; see `COMPILE_NOTES`.
"""

from __future__ import annotations

import os
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqdoctor.errors import NoQuantizerError
from vqdoctor.live.alerts import Alert, by_step, merge
from vqdoctor.live.store import (
    SCHEMA_VERSION,
    RunStore,
    StoreTail,
    WatchWarning,
    load_records,
    load_run,
    now_iso,
)

if TYPE_CHECKING:
    from vqdoctor.live.discovery import LiveQuantizer

DEFAULT_ROOT = "vqdoctor-runs"
# Steps of records the live alerts judge (twice the longest automatic usage window): enough for
# every rule's window and sustain checks, and a bound on the cost of each alert check.
ALERT_HISTORY_STEPS = 10_000

COMPILE_NOTES = """\
Under torch.compile (the whole model, or the quantizer alone) the watch records every signal it
records in eager mode: usage counts, perplexity, windowed usage, cadence statistics (scale,
nearest-code geometry, quantization error, non-finite counts, EMA drift, eval mutations), the
straight-through gradients and the gradient norms, also when the model is compiled after the
watch started. Its hooks run eagerly: they are wrapped in torch._dynamo.disable, so dynamo
graph-breaks around each quantizer call (compiled code runs before and after it); for a
quantizer compiled on its own the hooks sit on the OptimizedModule, outside its graph. Costs: one graph break per quantizer call, and the
encoder/decoder split of gradient norms falls back to module registration order (the one-time
trace of the first forward is skipped so the compiled graphs are not recompiled for it).
Checked with inductor and aot_eager on CPU (vector-quantize-pytorch VectorQuantize with
dead-code replacement off, diffusers VectorQuantizer). vector-quantize-pytorch with dead-code
replacement on fails to compile under inductor without vqdoctor too ("Node view was invalid,
but is output", in its replace path). Should a hook ever be traced anyway (a torch build
without torch._dynamo.disable), it detects that (torch.compiler.is_compiling()) and does
nothing, so the training is unaffected."""


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def default_run_dir(world_size: int = 1) -> Path:
    """A new folder under ./vqdoctor-runs/: timestamp plus a random suffix (from `secrets`, not torch).

    Under data parallelism every rank must agree on it: `VQDOCTOR_RUN_DIR` wins when set,
    otherwise the name is derived from the rendezvous (TORCHELASTIC_RUN_ID, MASTER_ADDR/PORT).
    """
    env = os.environ.get("VQDOCTOR_RUN_DIR")
    if env:
        return Path(env)
    if world_size > 1:
        import hashlib

        key = "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                                          "GROUP_WORLD_SIZE"))
        return Path(DEFAULT_ROOT) / f"ddp-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    return Path(DEFAULT_ROOT) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class Doctor:
    """A live watch over one model (returned by `vqdoctor.watch`; use it as a context manager).

    Attributes:
        run_dir: where the run is recorded.
        rank: this process's data-parallel rank.
        world_size: data-parallel world size.
        quantizers: the live quantizers found (names, modules, readers).
    """

    def __init__(self, model: Any, run_dir: str | os.PathLike[str] | None = None, *, flush_every: int = 50,
                 stats_every: int = 10, window: int | None = None,
                 quantizers: Sequence[Any] | None = None, fsync: bool = False, hist_every: int | None = None,
                 start_step: int = 0, on_flush: Callable[[list[dict[str, Any]]], None] | None = None,
                 command: list[str] | None = None,
                 exporters: Sequence[Callable[[list[dict[str, Any]]], None]] | None = None):
        from vqdoctor import __version__

        self.model = model
        self.rank, self.world_size = _rank_world()
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(self.world_size)
        self._named = quantizers
        self.config = {"flush_every": int(flush_every), "stats_every": int(stats_every),
                       "window": None if window is None else int(window),
                       "hist_every": int(hist_every or flush_every), "fsync": bool(fsync),
                       "start_step": int(start_step)}
        self._callbacks = ([on_flush] if on_flush is not None else []) + list(exporters or [])
        self.quantizers: list[LiveQuantizer] = []
        self.store = RunStore(self.run_dir, rank=self.rank, fsync=bool(fsync))
        self.store.meta = {
            "schema_version": SCHEMA_VERSION, "tool": {"name": "vqdoctor", "version": __version__},
            "created": now_iso(), "ended": None, "status": "running", "command": command,
            "cwd": os.getcwd(), "torch": _torch_version(), "world_size": self.world_size,
            "config": dict(self.config), "quantizers": [], "steps": None,
        }
        self._recorder = None
        self._upstream: list[Any] = []
        self._first_tables: dict[str, Any] | None = None  # gradient-trained codebooks at the first flush
        self._alerts: dict[tuple[str, str | None], Alert] = {}
        self._alerts_at = -1
        self._tail: StoreTail | None = None
        self._behaviour_handles: list[Any] = []
        self.started = False
        self.closed = False

    # -------------------------------------------------------------- lifecycle

    def start(self) -> Doctor:
        """Find the quantizers, open the run directory and attach the hooks.

        Raises:
            NoQuantizerError: a quantizer named in `quantizers=` was not found (nothing else
                raises: a model without any quantizer is watched for run-wide signals only).
        """
        if self.started:
            return self
        from vqdoctor.live.discovery import find_quantizers

        events: list[dict[str, Any]] = []
        try:
            self.quantizers = find_quantizers(self.model, self._named)
        except NoQuantizerError:
            raise
        except Exception as e:  # a discovery bug must not stop the training
            self.quantizers = []
            msg = f"vqdoctor: quantizer discovery failed ({type(e).__name__}: {e}); watching run-wide signals only"
            warnings.warn(msg, WatchWarning, stacklevel=2)
            events.append({"t": "event", "step": self.config["start_step"], "level": "error", "message": msg})
        if not self.quantizers and not self._named and self._watch_behaviour():
            events.append({"t": "event", "step": self.config["start_step"], "level": "info",
                           "message": "no quantizer found by layout; modules holding a [K, D] table are "
                                      "watched for code indices in their first forward"})
        elif not self.quantizers:
            msg = ("vqdoctor: no quantizer found in the model; watching run-wide signals only "
                   "(name one with quantizers=[...] or vqdoctor.register_adapter)")
            warnings.warn(msg, WatchWarning, stacklevel=2)
            events.append({"t": "event", "step": self.config["start_step"], "level": "warning", "message": msg})
        self._begin(events)
        return self

    def _begin(self, events: list[dict[str, Any]]) -> None:
        """Describe the quantizers, write the session's start, attach a recorder over them."""
        from vqdoctor.live.recorder import Recorder

        described = []
        for q in self.quantizers:
            d = q.describe()
            if q.notes:
                d["notes"] = list(dict.fromkeys(q.notes))
            described.append(d)
        self.store.meta["quantizers"] = described
        self.store.open()
        self.store.write_meta()
        self.store.append([{"t": "start", "rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                            "time": now_iso(), "step": self.config["start_step"], "quantizers": described,
                            "config": dict(self.config)}, *events])
        rec = Recorder(self.model, self.quantizers, self.store, flush_every=self.config["flush_every"],
                       stats_every=self.config["stats_every"], window=self.config["window"],
                       hist_every=self.config["hist_every"], start_step=self.config["start_step"],
                       world_size=self.world_size)
        rec.on_flush.extend(self._callbacks)
        rec.on_flush.append(self._snapshot_tables)
        rec.upstream = list(self._upstream)
        rec.attach()
        self._recorder = rec
        self.started = True

    def _watch_behaviour(self) -> bool:
        """Hook the candidate modules (`live.behaviour`) until one shows it is a quantizer: its
        forward returns indices into its own table. Then the watch starts over with it (at the
        first forward: nothing recorded is lost but that forward's counts). False: no candidate."""
        from vqdoctor.live.behaviour import candidates, confirms
        from vqdoctor.live.discovery import ModuleIndex

        index = ModuleIndex(self.model)
        found = candidates(index, [])
        handles: list[Any] = []

        def make(name: str, module: Any) -> Any:
            def hook(m: Any, args: Any, output: Any) -> None:
                try:
                    if self.closed or any(q.name == name for q in self.quantizers) or not confirms(
                            index.innermost(name) or m, output):
                        return
                    for h in handles:
                        h.remove()
                    self._adopt(name)
                except Exception as e:  # never let discovery break the training
                    for h in handles:
                        h.remove()
                    warnings.warn(f"vqdoctor: behaviour discovery failed ({type(e).__name__}: {e})",
                                  WatchWarning, stacklevel=2)
            return hook

        for name, module in found:
            handles.append(module.register_forward_hook(make(name, module)))
        self._behaviour_handles = handles
        return bool(found)

    def _adopt(self, name: str) -> None:
        """Start the session over with the quantizer `name` found by behaviour."""
        from vqdoctor.live.discovery import find_quantizers

        old = self._recorder
        self.quantizers = find_quantizers(self.model, [name])
        for q in self.quantizers:
            q.notes.append(f"found by behaviour: {name or '(root)'} returned indices into its own "
                           "codebook table (no known layout or name says it)")
        if old is not None:
            old.detach()
            old.closed = True
        self._begin([])

    def close(self, status: str = "finished") -> None:
        """Detach every hook, flush what is left, write the end-of-run records and metadata.

        Args:
            status: "finished" or "failed" (written to meta.json and the `end` record).
        """
        if self.closed or not self.started:
            self.closed = True
            return
        self.closed = True
        for h in self._behaviour_handles:
            h.remove()
        rec = self._recorder
        try:
            rec.detach()
        finally:
            try:
                if rec.pending:
                    rec.pending = False
                    rec._advance()
                rec.flush(final=True)
                rec.closed = True
                self.store.append(self._codebook_records(rec) + [{"t": "end", "step": rec.step, "status": status}])
                self.store.meta.update(status=status, ended=now_iso(), steps=rec.step - rec.start_step)
                if rec.window_steps is not None:
                    self.store.meta["config"]["window"] = rec.window_steps
                self.store.write_meta()
            except Exception as e:  # closing must never turn a finished training into a crash
                warnings.warn(f"vqdoctor: could not finish the run record ({type(e).__name__}: {e})",
                              WatchWarning, stacklevel=2)
            finally:
                rec.closed = True
                self.store.close()
                from vqdoctor.integrations.export import close_exporters  # TensorBoard / W&B

                close_exporters(self._callbacks)

    def _snapshot_tables(self, records: list[dict[str, Any]]) -> None:
        """At the first flush: a host copy of each gradient-trained codebook (up to 2**24 values),
        so the end of the run can tell the rows never selected since (bit for bit unchanged: no
        gradient reached them) from the codes in use, as two checkpoints do."""
        if self._first_tables is not None:
            return
        self._first_tables = {}
        try:
            import torch

            with torch.no_grad():
                for q in self.quantizers:
                    cb = q.codebook() if q.state.kind == "vq" else None
                    if cb is not None and cb.numel() <= 2 ** 24 and cb.is_floating_point():
                        self._first_tables[q.name] = cb.detach().float().cpu().clone()
        except Exception:
            self._first_tables = {}

    def _codebook_records(self, rec: Any) -> list[dict[str, Any]]:
        """Checkpoint-style metrics of each live codebook at the end of the session."""
        import dataclasses

        try:
            from vqdoctor.metrics.codebook import codebook_metrics
        except ImportError:  # pragma: no cover - metrics package not built yet
            return []
        out = []
        described = []
        for q in self.quantizers:
            try:
                import torch

                with torch.no_grad():
                    cb = q.codebook()
                    n = q.counts()
                    st = dataclasses.replace(
                        q.state,
                        codebook=None if cb is None else cb.detach().float().cpu().clone(),
                        cluster_size=None if n is None else n.detach().float().cpu().clone(),
                        embed_avg=None, optimizer=None, initted=_live_initted(q))
                first = (self._first_tables or {}).get(q.name)
                still = None
                if first is not None and st.codebook is not None and first.shape == st.codebook.shape:
                    from vqdoctor.metrics.drift import rows_unchanged, unchanged_rows

                    still = unchanged_rows(first, st.codebook)
                m = codebook_metrics(st, never_selected=still)
                if still is not None:
                    m.update(rows_unchanged(first, st.codebook))
                from vqdoctor.results.series import code_norm_record  # the report's norm histogram

                out.append({"t": "codebook", "step": rec.step, "q": q.name, **m, **code_norm_record(st.codebook)})
                d = dict(next((x for x in self.store.meta["quantizers"] if x.get("name") == q.name), {}))
                if st.initted is not None and d:
                    d["initted"] = st.initted  # the start-of-run value predates k-means
                described.append(d)
            except Exception as e:
                out.append({"t": "event", "step": rec.step, "level": "info", "q": q.name,
                            "message": f"end-of-run codebook metrics unavailable ({type(e).__name__}: {e})"})
        if described and all(described):
            self.store.meta["quantizers"] = described
        return out

    def __enter__(self) -> Doctor:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.close("failed" if exc_type is not None else "finished")
        return False

    # -------------------------------------------------------------- during training

    def step(self, loss: Any = None) -> None:
        """End the current training step (optionally recording its loss).

        Calling it makes it the step clock (optimizer steps are then not counted). The loss may
        be a tensor (copied on the device, no synchronisation) or a float.
        """
        if self._recorder is not None and not self.closed:
            self._recorder.user_step(loss)

    def set_upstream(self, modules: list[Any]) -> None:
        """Modules outside the watched model whose output it quantizes (the launcher finds them
        when the loop calls `encoder(x)` and `quantizer(z)` one after the other): their parameters
        are the encoder side of the step clock's gradient checks. Call before `start`."""
        self._upstream = list(modules)
        if self._recorder is not None:
            self._recorder.upstream = list(modules)

    def saw_backward(self) -> None:
        """Tell the step clock a backward pass ran (the launcher calls it from its `backward`
        wrapper): without an optimizer step of the model, a training forward after a backward
        starts the next step (hand-written updates)."""
        rec = self._recorder
        if rec is not None and not self.closed:
            rec.saw_backward()

    def record_loss(self, loss: Any) -> None:
        """Record the loss of the current step without ending it (the step clock stays as it is).

        Used by the zero-code launcher, which sees the loss in `backward`; a tensor is copied on
        the device (no synchronisation). A failure disables loss recording, once, with a warning.
        """
        rec = self._recorder
        if rec is None or self.closed or rec.closed or (-1, "loss") in rec._disabled:
            return
        try:
            rec._record_loss(loss)
        except Exception as e:
            rec.fail((-1, "loss"), e)

    @property
    def current_step(self) -> int:
        """Number of the step being recorded now."""
        return self._recorder.step if self._recorder is not None else int(self.config["start_step"])

    def flush(self) -> None:
        """Copy out and record everything up to the current step now (normally every flush_every steps)."""
        rec = self._recorder
        if rec is None or self.closed:
            return
        if rec.pending and not rec.explicit:
            rec.pending = False
            rec._advance()
        if rec.step > rec.interval_start:
            rec.flush()

    def on_flush(self, fn: Callable[[list[dict[str, Any]]], None]) -> None:
        """Call `fn(records)` after each flush with the records just written (the live panel's feed)."""
        if self._recorder is not None:
            self._recorder.on_flush.append(fn)
        else:
            self._callbacks.append(fn)

    def _records(self) -> tuple[dict[str, Any], dict[int, list[dict[str, Any]]]]:
        """Everything recorded so far: the run directory, plus what was kept in memory after a
        write failure (records written before the failure are read back from the file)."""
        if not self.store.failed:
            meta, streams = load_records(self.run_dir)
            return meta or dict(self.store.meta), streams
        try:
            meta, streams = load_records(self.run_dir)
        except Exception:
            meta, streams = {}, {}
        mine = streams.get(self.rank, [])
        if any(r.get("t") == "start" for r in self.store.memory):
            mine = []  # the directory never received this session's records
        streams[self.rank] = _after_last_start(mine + self.store.memory)
        return meta or dict(self.store.meta), streams

    def report(self, thresholds: dict[str, dict[str, Any]] | None = None):
        """Flush, then the ranked diagnosis of everything recorded so far (`vqdoctor.results.Report`)."""
        from vqdoctor.diagnosis import report_records as build_report

        self.flush()
        meta, streams = self._records()
        return build_report(meta, streams, [str(self.run_dir)], thresholds)

    @property
    def alerts(self) -> list[Alert]:
        """Findings (error/warning) seen so far, each with the step at which it first held.

        Computed from the records flushed so far when read (so it costs nothing while nobody
        looks); a finding keeps the earliest step it was ever seen at.
        """
        rec = self._recorder
        if rec is not None and rec.interval != self._alerts_at:
            self._alerts_at = rec.interval
            try:
                from vqdoctor.diagnosis import report_records

                if self.store.failed:
                    meta, streams = self._records()
                else:  # read incrementally, over a bounded history: the cost does not grow with the run
                    if self._tail is None:
                        self._tail = StoreTail(self.run_dir, keep_steps=ALERT_HISTORY_STEPS)
                    self._tail.poll()
                    meta, streams = self._tail.meta or dict(self.store.meta), self._tail.streams
                merge(self._alerts, report_records(meta, streams, [str(self.run_dir)]).findings)
            except Exception as e:
                warnings.warn(f"vqdoctor: alerts unavailable ({type(e).__name__}: {e})", WatchWarning, stacklevel=2)
        return by_step(self._alerts.values())


def _live_initted(q: LiveQuantizer) -> bool | None:
    """The quantizer's initialisation flag read from the live buffer now (None when it has none)."""
    key = q.state.keys.get("initted")
    if key is None or q.state.initted is None:
        return q.state.initted
    inner = q.module
    for attr in key[len(q.name) + 1:].split(".") if q.name else key.split("."):
        inner = getattr(inner, attr, None)
        if inner is None:
            return q.state.initted
    import torch

    if isinstance(inner, torch.Tensor):
        return bool(inner.detach().flatten()[0].item() > 0)  # at close: a host read is fine here
    return q.state.initted


def _after_last_start(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    idx = max((i for i, r in enumerate(records) if r.get("t") == "start"), default=0)
    return list(records[idx:])


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def watch(model: Any, run_dir: str | os.PathLike[str] | None = None, *, flush_every: int = 50,
          stats_every: int = 10, window: int | None = None, quantizers: Sequence[Any] | None = None,
          fsync: bool = False, hist_every: int | None = None, start_step: int = 0,
          on_flush: Callable[[list[dict[str, Any]]], None] | None = None,
          command: list[str] | None = None, tensorboard: str | os.PathLike[str] | None = None,
          wandb: Any = None, exporters: Sequence[Callable[[list[dict[str, Any]]], None]] | None = None
          ) -> Doctor:
    """Watch a model while it trains; use the result as a context manager.

    Args:
        model: the model (may be wrapped in DDP or torch.compile).
        run_dir: where to record (default: a new folder under ./vqdoctor-runs/).
        flush_every: steps between device->host copies (records appear on disk at each).
        stats_every: steps between cadence statistics (scale, drift, gradients, ...).
        window: steps of the windowed usage metrics (default: max(100, 4K / tokens per step),
            at most 5000).
        quantizers: module paths or modules to watch (default: all found).
        fsync: os.fsync the stream at each flush.
        hist_every: steps between usage-histogram records (default: flush_every).
        start_step: number of the first step (e.g. when resuming).
        on_flush: called with the records of each flush.
        command: the command line, for meta.json (the launcher sets it).
        tensorboard: also write the metrics to TensorBoard event files in this folder
            (`vqdoctor.integrations.export`; needs the tensorboard package).
        wandb: also log to Weights & Biases: True (the active run, else a new one), a dict of
            `WandbExporter` arguments, or a run (needs the wandb package).
        exporters: further callables given each flush's records (closed at the end when they
            have a `close()`).

    Returns:
        The `Doctor`; hooks are attached on `__enter__` (or `start()`).

    Raises:
        ConfigError: an exporter's package is not installed.
    """
    from vqdoctor.integrations.export import build_exporters

    exporters = build_exporters(tensorboard, wandb, exporters, rank=_rank_world()[0])
    return Doctor(model, run_dir, flush_every=flush_every, stats_every=stats_every, window=window,
                  quantizers=quantizers, fsync=fsync, hist_every=hist_every, start_step=start_step,
                  on_flush=on_flush, command=command, exporters=exporters)


__all__ = ["COMPILE_NOTES", "Alert", "Doctor", "WatchWarning", "default_run_dir", "load_run", "watch"]
