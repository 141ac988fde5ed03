"""The recorder: attaches the probes to a model, keeps the step clock, flushes to the run store.

What runs when (per quantizer; K codes, H heads, F = flush_every, C = stats_every):

- **Every training forward** (forward hook; a forward is "training" when the module is in train
  mode and grad is enabled): the probe counts the code indices into the slot row of the step
  (`probe.QuantizerProbe.count`: 2 kernels, no synchronisation).
- **Every C steps** (cadence; first training forward of the step): the forward pre-hook copies
  the codebook and counts; after the forward the probe writes its cadence statistics and hooks
  the straight-through gradients (`probe`). In the optimizer pre-step hook: gradient norms of
  encoder-side, quantizer and decoder-side parameters with `torch._foreach_norm` (0 for a side
  whose optimizer-held parameters got no gradient while another side did), and of each
  codebook Parameter.
- **Every forward in eval mode or under no_grad**: the probe checks whether it changed the
  quantizer's buffers (`eval_mutation`). Not counted as usage.
- **`doctor.step(loss=...)`**: a reference to the detached loss tensor is kept (no kernel, no
  `.item()`); the flush stacks the interval's losses into their rows in one copy. A Python
  float is kept on the host.
- **Every F steps** (flush): one device->host copy of the arena (`arena.Arena`), then the
  records are computed on the host (`flush.interval_records`) and appended to the run store.
  The only synchronisation of the watch happens here.

Nothing in the per-step or cadence paths reads a tensor value on the host (`.item()`,
`.cpu()`, `.tolist()`, `bool(t)`), or creates a data-dependent shape (`unique`, `nonzero`,
boolean masks): every result stays a device tensor of fixed shape until the flush.

The step clock: when the user calls `doctor.step()`, that call is the clock. Otherwise an
optimizer step (global `register_optimizer_step_post_hook`) of an optimizer holding model
parameters ends the step, provided a training forward of a quantizer happened since the last
step; the advance is applied lazily at the next training forward (or at `doctor.step`, or at
exit), so a user who also calls `doctor.step` is never double counted.

Never breaks training: every hook body is guarded; an exception disables that probe only,
is recorded once as an `event` record and warned once (`WatchWarning`); all hooks are removed
on close. The model's mode, parameters, buffers, gradients and RNG streams are never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from vqdoctor.live.arena import GN_CB, GN_ENC, LOSS, NF_GRAD, Arena, Clock
from vqdoctor.live.discovery import LiveQuantizer, ModuleIndex, contains_compiled
from vqdoctor.live.flush import QuantizerInterval, QuantizerTrack, RunInterval, interval_records
from vqdoctor.live.outputs import dynamo_disable, is_compiling
from vqdoctor.live.probe import ProbeContext, QuantizerProbe
from vqdoctor.live.store import RunStore, WatchWarning
from vqdoctor.metrics import usage as U


class Recorder:
    """Attaches the hooks to a model and turns what they see into run-store records.

    Args:
        model: the model (wrappers looked through).
        quantizers: the live quantizers (`live.discovery.find_quantizers`).
        store: the run store writer.
        flush_every: F, steps between device->host copies.
        stats_every: C, steps between cadence statistics.
        window: W, steps of the windowed usage metrics (None: `stats.auto_window`).
        hist_every: steps between `hist` records (a multiple of F).
        start_step: number of the first step.
        world_size: data-parallel world size.
    """

    def __init__(self, model: nn.Module, quantizers: list[LiveQuantizer], store: RunStore, *,
                 flush_every: int = 50, stats_every: int = 10, window: int | None = None,
                 hist_every: int | None = None, start_step: int = 0, world_size: int = 1):
        self.model = model
        self.quantizers = quantizers
        self.store = store
        self.F = max(1, int(flush_every))
        self.C = max(1, int(stats_every))
        self.window = int(window) if window else None
        he = int(hist_every or self.F)
        self.hist_every = max(self.F, -(-he // self.F) * self.F)
        self.world_size = world_size
        self.clock = Clock(start_step)
        self.explicit = False
        self.pending = False
        self.fwd_since_advance = False
        self.step_has_data = False
        self.fwd_step = self.step
        self.grad_step = -1
        self._opt_stepped = False   # an optimizer of this model has stepped
        self._backward_seen = False  # a backward ran since the last training forward
        self._backwards = 0            # backward passes seen (the launcher's wrapper)
        self.upstream: list[nn.Module] = []  # modules outside the model feeding it (its encoder)
        self.closed = False
        self.on_flush: list[Callable[[list[dict[str, Any]]], None]] = []
        self.events: list[dict[str, Any]] = []
        self._disabled: set[tuple[int, str]] = set()
        self._warned: set[tuple[int, str]] = set()
        self._handles: list[Any] = []
        self._trace_handles: list[Any] = []
        self._trace_order: dict[int, int] = {}
        self._first_q_pos: int | None = None
        self._sides: tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]] | None = None
        self._opt_owner: dict[int, tuple[int, bool]] = {}
        self._opt_param_ids: set[int] = set()
        self._loss_host: dict[int, float] = {}
        self._loss_dev_steps: set[int] = set()
        self._loss_refs: dict[int, torch.Tensor] = {}  # slot -> detached loss, written at the flush
        self.compiled = contains_compiled(model)
        self.index = ModuleIndex(model)
        self.device = self._pick_device()
        self.zero = torch.zeros((), device=self.device)
        self.nan = torch.full((), float("nan"), device=self.device)
        self.ctx = ProbeContext(self.device, world_size, self.clock, self.guard, self._disabled_names)
        self.probes = [QuantizerProbe(self.ctx, i, q) for i, q in enumerate(quantizers)]
        self.arena = Arena(self.device, self.F, [p.width for p in self.probes], [p.fp_size for p in self.probes])
        self.ctx.arena = self.arena
        self.tracks = [QuantizerTrack() for _ in self.probes]
        self.window_steps: int | None = self.window
        self._st_layout()

    def _st_layout(self) -> None:
        """Decide per quantizer where the straight-through gradients can be compared directly.

        The gradient at a quantizer's input equals the one at its output (plus the commitment
        term) only when both live in the code space: a vector-quantizer kind (not FSQ / LFQ,
        whose bounding nonlinearity scales the gradient, nor Gumbel-softmax, which has no
        straight-through path), no projection inside the hooked module (`project_in`, or any
        parameter other than [.., K, D] tables: DAC in_proj / out_proj, taming's Gumbel `proj`),
        and, in a residual group, the last stage (an earlier stage's output also feeds the
        residual of the next stage, so its output gradient is not the task gradient: encodec).
        Elsewhere only "nothing passes at all" is meaningful.
        """
        stages: dict[str, list[int]] = {}
        for p in self.probes:
            st = p.q.state
            if st.group is not None and st.stage is not None:
                stages.setdefault(st.group, []).append(int(st.stage))
        for p in self.probes:
            st = p.q.state
            K, D = p.K, p.q.code_dim
            cb_param = p.q.codebook_param
            extra = any(prm is not cb_param and tuple(prm.shape[-2:]) != (K, D) for prm in p.q.module.parameters())
            group = stages.get(st.group) if st.group is not None and st.stage is not None else None
            last = group is None or int(st.stage) == max(group)
            p.st_first_stage = group is None or int(st.stage) == min(group)
            p.st_code_space = (st.kind in ("vq", "vq-ema") and p.q.project_in is None and st.project_in is None
                               and st.metric != "cosine" and not extra and last)

    # ------------------------------------------------------------------ setup

    def _pick_device(self) -> torch.device:
        for q in self.quantizers:
            cb = q.codebook()
            if cb is not None:
                return cb.device
            for t in list(q.module.parameters())[:1] + list(q.module.buffers())[:1]:
                return t.device
        for t in self.model.parameters():
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ guards

    # the clock's fields, as the Doctor and the launcher read them
    step = property(lambda self: self.clock.step, lambda self, v: setattr(self.clock, "step", v))
    start_step = property(lambda self: self.clock.start_step)
    interval_start = property(lambda self: self.clock.interval_start,
                              lambda self, v: setattr(self.clock, "interval_start", v))
    interval = property(lambda self: self.clock.interval, lambda self, v: setattr(self.clock, "interval", v))

    def _disabled_names(self, i: int) -> set[str]:
        """The disabled parts of probe `i` (-1: the run-wide hooks)."""
        return {k for (j, k) in self._disabled if j == i}

    def guard(self, i: int, what: str, fn: Callable) -> Callable:
        """`fn` wrapped so that an exception disables (probe `i`, `what`) instead of reaching the
        training (-1: a run-wide hook)."""
        key = (i, what)

        def guarded(*args: Any, **kwargs: Any) -> None:
            if self.closed or key in self._disabled or is_compiling():
                return None
            try:
                fn(*args, **kwargs)
            except Exception as e:  # never let a probe break the training
                self.fail(key, e)
            return None

        return dynamo_disable(guarded)

    def fail(self, key: tuple[int, str], e: BaseException) -> None:
        """Disable one probe after an exception; one event record and one warning."""
        self._disabled.add(key)
        if key in self._warned:
            return
        self._warned.add(key)
        qname = self.quantizers[key[0]].name if 0 <= key[0] < len(self.quantizers) else None
        where = f"quantizer {qname!r} " if qname is not None else ""
        msg = f"vqdoctor {where}probe '{key[1]}' raised {type(e).__name__}: {e}; probe disabled, training continues"
        ev: dict[str, Any] = {"t": "event", "step": self.step, "level": "error", "message": msg}
        if qname is not None:
            ev["q"] = qname
        self.events.append(ev)
        warnings.warn(msg, WatchWarning, stacklevel=2)

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> None:
        """Register every hook (module, optimizer, first-forward trace)."""
        for p in self.probes:
            m = p.q.module
            self._handles.append(m.register_forward_pre_hook(self.guard(p.i, "pre", self._pre(p)), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self.guard(p.i, "post", self._post(p)), with_kwargs=True))
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._handles.append(register_optimizer_step_pre_hook(self.guard(-1, "grad", self._opt_pre)))
        self._handles.append(register_optimizer_step_post_hook(self.guard(-1, "clock", self._opt_post)))
        if not self.compiled:
            # one-time trace of the order modules run in, for the encoder/decoder split
            qmods = {id(p.q.module) for p in self.probes}
            for m in self.model.modules():
                if m._parameters and id(m) not in qmods:
                    self._trace_handles.append(m.register_forward_pre_hook(self.guard(-1, "trace", self._tracer(m))))

    def _tracer(self, m: nn.Module) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._trace_order.setdefault(id(m), len(self._trace_order))
        return hook

    def _stop_trace(self) -> None:
        for h in self._trace_handles:
            h.remove()
        self._trace_handles = []

    def detach(self) -> None:
        """Remove every hook, including tensor hooks still pending."""
        for h in self._handles + self._trace_handles:
            try:
                h.remove()
            except Exception:
                pass
        self._handles, self._trace_handles = [], []
        for p in self.probes:
            for h in p.tensor_handles:
                try:
                    h.remove()
                except Exception:
                    pass
            p.tensor_handles = []
            p.snap = None
            p.eval_before = None

    # ------------------------------------------------------------------ module hooks

    def _pre(self, p: QuantizerProbe) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._first_q_pos is None:
                # any mode: an evaluation pass before training runs the modules in the same order
                self._first_q_pos = len(self._trace_order)
            if module.training and torch.is_grad_enabled():
                if self.pending and not self.explicit:
                    self.pending = False
                    self._advance()
                elif (not self.explicit and not self._opt_stepped and self._backward_seen
                      and self.fwd_since_advance):
                    # no optimizer steps this model (a hand-written update): a training forward
                    # after a backward starts the next step
                    self._advance()
                self._backward_seen = False
                if self.step % self.C == 0 and p.cadence_step != self.step and p.pre_step != self.step:
                    off = self._disabled_names(p.i)
                    if "stats" not in off and "pre" not in off:
                        with torch.no_grad():
                            p.pre_snapshot(self.step)
            elif "eval" not in self._disabled_names(p.i):
                try:
                    p.eval_pre()
                except Exception as e:
                    self.fail((p.i, "eval"), e)
        return pre

    def _post(self, p: QuantizerProbe) -> Callable:
        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                if p.eval_before is not None:
                    try:
                        p.eval_post()
                    except Exception as e:
                        self.fail((p.i, "eval"), e)
                return
            self.fwd_since_advance = True
            self.step_has_data = True
            self.fwd_step = self.step
            off = self._disabled_names(p.i)
            with torch.no_grad():
                if "count" not in off:
                    try:
                        p.count(output, args, kwargs)
                    except Exception as e:
                        self.fail((p.i, "count"), e)
                if self.step % self.C == 0 and p.cadence_step != self.step and "stats" not in off:
                    p.cadence_step = self.step
                    try:
                        p.cadence_forward(args, kwargs, output, self.step)
                    except Exception as e:
                        self.fail((p.i, "stats"), e)
        return post

    @property
    def slot(self) -> int:
        """Row of the slot buffers that belongs to the current step."""
        return self.clock.slot

    # ------------------------------------------------------------------ optimizer hooks

    def _owns(self, opt: torch.optim.Optimizer) -> bool:
        """True when `opt` steps this model: it holds model parameters, or the model has none in
        any optimizer (an EMA quantizer watched as its own root, the loop calling encoder,
        quantizer and decoder one after the other: the optimizer holds only the others)."""
        n = sum(len(g["params"]) for g in opt.param_groups)
        cached = self._opt_owner.get(id(opt))
        if cached is not None and cached[0] == n:
            return cached[1]
        model_ids = {id(p) for p in self.model.parameters()}
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        owns = bool(ids & model_ids) or not any(o for _, o in self._opt_owner.values())
        self._opt_owner[id(opt)] = (n, owns)
        if owns:
            self._opt_param_ids |= ids
        return owns

    def _opt_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._owns(opt):
            return
        self._stop_trace()
        s = self.fwd_step
        if s % self.C != 0 or self.grad_step == s or not (self.interval_start <= s < self.interval_start + self.F):
            return
        self.grad_step = s
        with torch.no_grad():
            self._grad_norms(s - self.interval_start)

    def _opt_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.explicit or not self._owns(opt):
            return
        self._opt_stepped = True
        if self.fwd_since_advance:
            self.pending = True

    def _encoder_learns(self) -> bool:
        """True when encoder-side parameters require grad and a stepping optimizer holds them, or,
        with no optimizer stepping the model (hand-written updates), backward passes run."""
        if self._first_q_pos is None and self._sides is None and not self.upstream:
            return False
        enc = self._side_lists()[0]
        by_hand = not self._opt_stepped and self._backwards > 0
        return any(p.requires_grad and (by_hand or id(p) in self._opt_param_ids) for p in enc)

    def _side_lists(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(encoder-side, quantizer, decoder-side) parameters, decided once.

        Modules that ran before the first quantizer in the first forward are encoder-side, the
        rest decoder-side; modules never seen running (or a compiled model, where the trace is
        skipped) fall back to registration order relative to the first quantizer. `upstream`
        modules (outside the model, feeding it) are encoder-side.
        """
        if self._sides is not None:
            return self._sides
        qmods: set[int] = set()
        for p in self.probes:
            qmods |= {id(m) for m in p.q.module.modules()}
        reg = self.index.order
        first_q_reg = min((reg.get(id(p.q.module), 1 << 30) for p in self.probes), default=1 << 30)
        first_q_trace = self._first_q_pos
        enc, quant, dec = [], [], []
        seen: set[int] = set()
        for m in self.model.modules():
            for prm in m._parameters.values():
                if prm is None or id(prm) in seen:
                    continue
                seen.add(id(prm))
                if id(m) in qmods:
                    quant.append(prm)
                elif first_q_trace is not None and id(m) in self._trace_order:
                    (enc if self._trace_order[id(m)] < first_q_trace else dec).append(prm)
                else:
                    (enc if reg.get(id(m), 1 << 30) < first_q_reg else dec).append(prm)
        for m in self.upstream:  # the loop's encoder, called before this model
            for prm in m.parameters():
                if id(prm) not in seen:
                    seen.add(id(prm))
                    enc.append(prm)
        self._sides = (enc, quant, dec)
        return self._sides

    def _grad_norms(self, slot: int) -> None:
        """Gradient norms of the encoder side, the quantizers and the decoder side.

        A side none of whose parameters has a gradient reads 0 (not "not measured") when it
        holds parameters that require grad and belong to a stepping optimizer while another
        side has gradients: the backward ran and missed them (an encoder output detached
        before the quantizer leaves the encoder's `.grad` at None all run).
        """
        enc, quant, dec = self._side_lists()
        groups = []
        expects = []
        for plist in (enc, quant, dec):
            groups.append([p.grad for p in plist if p.grad is not None and not p.grad.is_sparse])
            expects.append(any(p.requires_grad and id(p) in self._opt_param_ids for p in plist))
        flat = [g for grp in groups for g in grp]
        run = self.arena.run[slot]
        if flat:
            norms = torch.stack([n.to(self.device, torch.float32) for n in torch._foreach_norm(flat)])
            sq = norms * norms
            vals = []
            a = 0
            for grp, exp in zip(groups, expects, strict=True):
                b = a + len(grp)
                vals.append(sq[a:b].sum().sqrt() if b > a else (self.zero if exp else self.nan))
                a = b
            vals.append((~torch.isfinite(norms)).sum(dtype=torch.float32))
            run[GN_ENC:NF_GRAD + 1].copy_(torch.stack([vals[0], vals[2], vals[1], vals[3]]))
        for p in self.probes:
            prm = p.q.codebook_param
            if prm is not None and prm.grad is not None and not prm.grad.is_sparse:
                self.arena.stats[p.i][slot, GN_CB].copy_(torch.linalg.vector_norm(prm.grad.detach().float()))

    # ------------------------------------------------------------------ the step clock

    def user_step(self, loss: Any = None) -> None:
        """`doctor.step(loss=...)`: record the loss of the current step, then end the step."""
        if self.closed:
            return
        self.explicit = True
        self.pending = False
        if loss is not None and (-1, "loss") not in self._disabled:
            try:
                self._record_loss(loss)
            except Exception as e:
                self.fail((-1, "loss"), e)
        self._advance()

    def saw_backward(self) -> None:
        """A backward pass ran (the launcher's wrapper): the step clock when no optimizer steps."""
        self._backward_seen = True
        self._backwards += 1

    def _record_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
            # a reference, no kernel: the flush stacks the interval's losses in one go
            self._loss_refs[self.slot] = loss.detach()
            self._loss_dev_steps.add(self.step)
        else:
            self._loss_host[self.step] = float(loss)

    def _advance(self) -> None:
        self._stop_trace()
        self.step += 1
        self.fwd_since_advance = False
        self.step_has_data = False
        if self.step - self.interval_start >= self.F:
            self.flush()

    # ------------------------------------------------------------------ flush

    def flush(self, final: bool = False) -> list[dict[str, Any]]:
        """Copy the slot buffers to the host once and append the interval's records.

        Args:
            final: also record the current, unfinished step (at close).

        Returns:
            The records appended.
        """
        if (-1, "flush") in self._disabled:
            # nothing is recorded any more, but the slot index must stay inside the buffers
            self.interval_start = self.step
            self.interval += 1
            return []
        try:
            return self._flush(final)
        except Exception as e:
            self.fail((-1, "flush"), e)
            # everything is lost for this interval, but the next one starts clean
            self.interval_start = self.step
            self.interval += 1
            try:
                self.arena.reset()
            except Exception:
                pass
            return []

    def _flush(self, final: bool) -> list[dict[str, Any]]:
        n = self.step - self.interval_start
        if final and (self.step_has_data or self.step in self._loss_host or self.step in self._loss_dev_steps
                      or any(self.step in p.host_evalmut for p in self.probes)):
            n += 1
        n = min(n, self.F)
        records: list[dict[str, Any]] = []
        if n > 0:
            with torch.no_grad():
                self._write_losses()
                host = self.arena.buf.to("cpu", copy=True).numpy()  # the one synchronisation
                partial = not final and n < self.F and self.step_has_data
                carry = self.arena.rows(n) if partial else None
                self.arena.reset()
                if carry is not None:  # a flush in the middle of a step keeps that step's data
                    self.arena.set_rows(0, carry)
            records = self._records(host, n, final)
        records = self.events + records
        self.events = []
        first = self.interval_start
        self.interval_start = first + n if final else self.step
        self.interval += 1
        self._loss_host = {k: v for k, v in self._loss_host.items() if k >= self.interval_start}
        self._loss_dev_steps = {k for k in self._loss_dev_steps if k >= self.interval_start}
        self.store.append(records)
        for cb in list(self.on_flush) if records else ():
            try:
                cb(records)
            except Exception as e:
                self.on_flush.remove(cb)
                self.fail((-1, f"on_flush:{getattr(cb, '__name__', 'callback')}"), e)
        return records

    def _write_losses(self) -> None:
        """Write the interval's recorded losses into their slot cells (a stack and one copy)."""
        refs, self._loss_refs = self._loss_refs, {}
        if not refs:
            return
        slots = torch.tensor(list(refs), device=self.device)  # at the flush, where a copy may wait
        vals = torch.stack([t.reshape(()).to(self.device, torch.float32) for t in refs.values()])
        self.arena.run[:, LOSS].index_copy_(0, slots, vals)

    def _records(self, host: np.ndarray, n: int, final: bool) -> list[dict[str, Any]]:
        """The interval's records from the host copy of the arena (`flush.interval_records`)."""
        def view(t: torch.Tensor) -> np.ndarray:
            return self.arena.host_view(host, t)

        first = self.interval_start
        counts_of = {p.i: view(self.arena.counts[p.i])[:n].reshape(n, p.H, p.Kp)[:, :, : p.K].astype(np.float64)
                     for p in self.probes}
        if self.window_steps is None:
            # one window for the whole run: the longest any quantizer needs
            ws = []
            for p in self.probes:
                tok = counts_of[p.i].sum(-1).mean(-1)
                tok = tok[tok > 0]
                if len(tok):
                    ws.append(U.auto_window(p.K, float(np.median(tok))))
            if ws:
                self.window_steps = max(ws)
                self.store.meta.setdefault("config", {})["window"] = self.window_steps
                self.store.write_meta()
        W = self.window_steps or U.WINDOW_MIN
        last = first + n - 1
        hist_due = final or (last + 1 - self.start_step) % self.hist_every == 0
        parts = []
        for p, track in zip(self.probes, self.tracks, strict=True):
            cb = p.q.codebook()
            prm = p.q.codebook_param
            in_opt = None
            if prm is not None and prm.requires_grad and self._opt_owner:
                in_opt = 1.0 if id(prm) in self._opt_param_ids else 0.0
            parts.append((QuantizerInterval(
                name=p.q.name, kind=p.q.state.kind, codebook_size=p.K, heads=p.H,
                levels=tuple(p.q.state.levels) if p.q.state.levels else None,
                state_heads=max(1, p.q.state.heads), replaces=p.q.replaces, st_code_space=p.st_code_space,
                codebook_numel=int(cb.numel()) if cb is not None else 0, counts=counts_of[p.i],
                stats=view(self.arena.stats[p.i])[:n], evalmut=view(self.arena.evalmut[p.i])[:n],
                host_evalmut=p.host_evalmut, forwards=p.forwards, cadence_steps=p.cadence_steps, dsteps=p.dsteps,
                fingerprints=view(self.arena.fp[p.i])[:n] if p.fp_size else None, fp_rows=p.fp_rows,
                codebook_in_optimizer=in_opt), track))
        run = RunInterval(first, view(self.arena.run)[:n], self._loss_host, self._loss_dev_steps)
        out = interval_records(run, parts, W, hist_due, self._encoder_learns)
        for p in self.probes:  # what the probes noted for the steps just recorded is done
            p.cadence_steps = {s for s in p.cadence_steps if s >= first + n}
            p.host_evalmut = {k: v for k, v in p.host_evalmut.items() if k >= first + n}
            p.forwards = {k: v for k, v in p.forwards.items() if k >= first + n}
            p.dsteps = {k: v for k, v in p.dsteps.items() if k >= first + n}
        return out
