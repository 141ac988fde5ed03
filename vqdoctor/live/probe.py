"""The per-quantizer probe: what the watch measures on one quantizer, on the device.

Every training forward: the code indices (read by `outputs.OutputReader`) are counted into the
quantizer's slot row with `torch.remainder` (folds -1 / out-of-range indices into a junk bin, so
a bad index can never trigger a device-side assert) and one `scatter_add_`: 2 kernels (+1 to
offset heads, +1 to widen int32 indices). Every cadence step (first training forward of the
step): scale, nearest-code geometry, quantization error, non-finite counts, the codebook's change
across the forward and the rows it replaced, EMA drift, the EMA count mass and, with several
ranks, a codebook fingerprint, written into the slot's stats row in one copy; and
straight-through gradient hooks on the forward's output and input. Every forward in eval mode or
under no_grad: whether it changed the quantizer's buffers (`eval_mutation`) and how far it moved
the codebook. The statistics are `metrics.device` functions; nothing reads a value on the host.

A probe depends on a `ProbeContext` (device, arena, clock, guards, world size), which the
recorder owns; the recorder depends on the probes, not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vqdoctor.live.arena import (
    BLOWUP_N,
    CODE_MAX,
    CODE_NORM,
    COUNT_SUM,
    DRIFT_NORM,
    EVM_CHANGE,
    EVM_COUNT,
    FWD_CHANGE,
    JUMPED,
    N_FWD,
    NEAREST,
    NF_BUF,
    NF_IN,
    NF_OUT,
    QERR,
    SPACING,
    ST_DOT,
    ST_DOT_R,
    ST_GIN,
    ST_GOUT,
    ST_NOGRAD_IN,
    ST_RR,
    Z_NORM,
    Z_SAT,
    Z_SPREAD,
    Arena,
    Clock,
    bits,
    scalar,
)
from vqdoctor.live.discovery import LiveQuantizer
from vqdoctor.live.outputs import OutputReader, functional_projection
from vqdoctor.live.store import FP_BLOCKS
from vqdoctor.metrics import device as MD

# Fingerprint (world size > 1): codebook rows sampled at fixed positions, and FP_BLOCKS block sums.
FP_ROWS = 8
# A codebook row "jumped" (was replaced) when it moved by more than this x the median code norm
# in one training forward (or, chosen by no input of the step, by this x its own norm).
JUMP_REL = 0.5
# Input rows compared with every code for the nearest-code distance, and codes (evenly spaced,
# fixed) whose pairwise distances give the typical code spacing: bounded work for any K.
NN_ROWS = 256
SPACING_CODES = 128
# A count that rises by more than this (relative) above max(count before, hits this step) in one
# forward was reset, not averaged: an EMA update lies between the two.
COUNT_RESET_REL = 1e-4

Guard = Callable[[int, str, Callable], Callable]


@dataclass
class ProbeContext:
    """What every probe of one recorder shares.

    Attributes:
        device: where the arena lives.
        world_size: data-parallel world size (fingerprints, and whether this rank's hits are global).
        clock: the step clock (current step, slot, interval).
        guard: wraps a hook body so that an exception disables (probe index, what) instead of
            reaching the training.
        disabled: probe index -> the names of its disabled parts.
        arena: the slot buffers (set once every probe's width is known).
    """

    device: torch.device
    world_size: int
    clock: Clock
    guard: Guard
    disabled: Callable[[int], set[str]]
    arena: Arena | None = None
    one: torch.Tensor = field(init=False)
    nan: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.one = torch.ones((), device=self.device)
        self.nan = torch.full((), float("nan"), device=self.device)


class QuantizerProbe:
    """What the watch measures on one quantizer, on the device, into its arena cells.

    Depends on the shared `ProbeContext` (device, arena, clock, guards), not on the recorder.

    Args:
        ctx: the shared context.
        i: this quantizer's index (its arena cells).
        q: the live quantizer.
    """

    def __init__(self, ctx: ProbeContext, i: int, q: LiveQuantizer):
        self.ctx = ctx
        self.i = i
        self.q = q
        self.K = q.codebook_size
        self.Kp = self.K + 1  # + junk bin
        self.H = max(1, q.index_heads)
        self.width = self.H * self.Kp
        self.cadence_step = -1
        self.snap: torch.Tensor | None = None
        self.snap_step: int | None = None
        self.dsteps: dict[int, int] = {}        # cadence step -> steps since previous snapshot
        self.cadence_steps: set[int] = set()
        self.cadence_seen = False
        self.host_evalmut: dict[int, int] = {}
        self.forwards: dict[int, int] = {}      # step -> training forwards counted (host ints)
        self.eval_before: tuple[list, list[torch.Tensor | None]] | None = None
        self.offsets: torch.Tensor | None = None
        self.tensor_handles: list[Any] = []
        self.reader = OutputReader(self.K, self.H, q.input_dim, q.channel_first, q.indices, q.quantized)
        self.project = functional_projection(q.project_in)
        # the layout read from the state dict knows input projections the live module may keep
        # under other names (DAC's in_proj): without a module to apply, inputs are not in code space
        self.project_ok = (q.project_in is None and q.state.project_in is None) or self.project is not None
        self.fp_rows: list[int] = []
        cb = q.codebook()
        self.fp_size = 0
        self.fp_step = 1.0
        if cb is not None and ctx.world_size > 1:
            n = cb.shape[0] * cb.shape[1]
            m = min(FP_ROWS, n)
            self.fp_step = (n - 1) / max(m - 1, 1)
            self.fp_rows = [round(j * self.fp_step) for j in range(m)]  # distinct: fp_step >= 1
            self.fp_size = len(self.fp_rows) * cb.shape[-1] + FP_BLOCKS
        self.fp_index: torch.Tensor | None = None
        self.spacing_index: torch.Tensor | None = None
        self.spacing_pairs: torch.Tensor | None = None
        # codebook and counts just before the cadence step's training forward (persistent buffers)
        self.pre_cb: torch.Tensor | None = None
        self.pre_counts: torch.Tensor | None = None
        self.pre_step: int | None = None
        self.eval_cb: torch.Tensor | None = None
        # straight-through comparison: set by the recorder once every probe exists (`_st_layout`)
        self.st_code_space = False
        self.st_first_stage = True
        # the quantizer's buffers, by owner and name (re-read at use: libraries re-register them)
        self._buffer_refs = [(m, name) for m in q.module.modules() for name, b in m._buffers.items()
                             if b is not None]
        self.nonfinite_targets = [b for b in q.module.buffers() if b.is_floating_point()]
        if q.codebook_param is not None and all(q.codebook_param is not b for b in self.nonfinite_targets):
            self.nonfinite_targets.append(q.codebook_param)

    def module_buffers(self) -> Iterable[torch.Tensor]:
        """The quantizer's buffers, read from their owners now (follows re-registration)."""
        for m, name in self._buffer_refs:
            b = m._buffers.get(name)
            if b is not None:
                yield b

    # ---------------------------------------------------------------- per forward (training)

    def count(self, output: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        """Count code indices of one training forward: remainder + scatter_add_ (2 kernels).

        The indices are the first integer tensor of the output; failing that, a float
        assignment tensor `[..., K]` (one-hot encodings, as the zalando / Sonnet-style modules
        return, or soft assignments) is read by its argmax (+1 kernel).
        """
        ctx = self.ctx
        idx = self.reader.indices(output, args, kwargs)
        if idx is not None:  # gradient accumulation: several forwards (EMA updates) per step
            step = ctx.clock.step
            self.forwards[step] = self.forwards.get(step, 0) + 1
        if idx is None:
            return
        if idx.device != ctx.device:
            idx = idx.to(ctx.device, non_blocking=True)
        if idx.dtype != torch.int64:
            idx = idx.long()
        idx = torch.remainder(idx, self.Kp)
        if self.H > 1:
            if idx.dim() == 0 or idx.shape[-1] != self.H:
                raise RuntimeError(f"index tensor of shape {tuple(idx.shape)} does not end in the "
                                   f"{self.H} heads of the codebook")
            if self.offsets is None or self.offsets.device != idx.device:
                self.offsets = torch.arange(self.H, device=idx.device, dtype=torch.int64) * self.Kp
            idx = idx + self.offsets
        flat = idx.reshape(-1)
        ctx.arena.count_rows[self.i][ctx.clock.slot].scatter_add_(0, flat, ctx.one.expand(flat.shape[0]))

    # ---------------------------------------------------------------- cadence (forward)

    def cadence_forward(self, args: tuple, kwargs: dict, output: Any, step: int) -> None:
        """Scale, error, non-finite, drift and count statistics of a cadence step (one copy)."""
        ctx = self.ctx
        nan = ctx.nan
        vals: list[torch.Tensor] = [nan] * N_FWD
        x = self.reader.input(args, kwargs)
        qt = self.reader.quantized(output, x)
        D = self.q.code_dim
        zs: torch.Tensor | None = None
        if x is not None:
            self.reader.settle_layout(x, output)
        xs = self.reader.rows(x) if x is not None else None
        if xs is not None:
            zs = xs.detach().float()
            if self.project is not None:
                zs = self.project(zs)
            elif not self.project_ok:
                zs = None
            if zs is not None and D and zs.shape[-1] != D:
                # head slices (lucidrains `heads`); any other width is a map we cannot apply
                heads = max(1, int(self.q.state.input_heads or 1))
                zs = zs.reshape(-1, D) if heads > 1 and zs.shape[-1] == heads * D else None
            if zs is not None:
                vals[Z_NORM] = torch.linalg.vector_norm(zs, dim=-1).median()
                vals[Z_SPREAD] = MD.input_spread(zs, self.q.state.metric == "cosine")
                vals[Z_SAT] = MD.saturated_share(zs)  # of the code-space inputs, as a probe
            else:
                # before an input map we cannot evaluate (DAC's in_proj, a Gumbel head): the
                # module's own input vectors; a collapsed input is collapsed on either side
                vals[Z_SPREAD] = MD.input_spread(xs, False)
            if qt is not None:
                qs = self.reader.rows(qt)
                if qs is not None and qs.shape == xs.shape:
                    xf = xs.detach().float()
                    err = torch.linalg.vector_norm(qs.detach().float() - xf, dim=-1)
                    vals[QERR] = (err / torch.linalg.vector_norm(xf, dim=-1).clamp_min(1e-30)).median()
        if x is not None:
            vals[NF_IN] = x.numel() - torch.isfinite(x.detach()).sum(dtype=torch.float32)
        if qt is not None:
            vals[NF_OUT] = qt.numel() - torch.isfinite(qt.detach()).sum(dtype=torch.float32)
        cb = self.q.codebook()
        counts = self.q.counts()
        if cb is not None:
            cbd = cb.detach()
            cnt = None if counts is None else counts.detach()
            norms = torch.linalg.vector_norm(cbd.float(), dim=-1)                 # [H, K]
            code_med = MD.code_norm_median(cbd, cnt, norms)
            vals[CODE_NORM] = code_med
            vals[CODE_MAX], vals[BLOWUP_N] = MD.blowup(norms, code_med, vals[Z_NORM], nan)
            if zs is not None and zs.shape[-1] == cbd.shape[-1]:
                geo = self._geometry(zs, cbd.float())
                if geo is not None:
                    vals[NEAREST], vals[SPACING], vals[QERR] = geo
            if self.pre_cb is not None and self.pre_step == step and self.pre_cb.shape == cbd.shape:
                vals[FWD_CHANGE], jumped = self._forward_change(cbd, cnt, code_med)
                if jumped is not None:
                    vals[JUMPED] = jumped
            if self.snap is not None and self.snap.shape == cbd.shape:
                vals[DRIFT_NORM] = torch.linalg.vector_norm(cbd.float() - self.snap.float())
                self.dsteps[step] = step - (self.snap_step if self.snap_step is not None else step)
                self.snap.copy_(cbd)
            else:
                self.snap = cbd.clone()
            self.snap_step = step
            if self.fp_size:
                self._fingerprint(cbd)
        bufs = self.nonfinite_targets
        if bufs:
            total = sum(b.numel() for b in bufs)
            finite = torch.stack([torch.isfinite(b.detach()).sum(dtype=torch.float32) for b in bufs]).sum()
            vals[NF_BUF] = total - finite
        if counts is not None:
            vals[COUNT_SUM] = counts.detach().sum(dtype=torch.float32)
        row = ctx.arena.stats[self.i][ctx.clock.slot]
        row[:N_FWD].copy_(torch.stack([scalar(v, ctx.device) for v in vals]))
        self.cadence_steps.add(step)
        self.cadence_seen = True
        # straight-through passthrough: gradient hooks on this forward's output and input. An
        # input that does not require grad (the encoder output was detached, or no encoder) is
        # flagged 1; the flush decides whether an encoder that should learn is behind it. An
        # output that carries no gradient while the input does (the code looked up from a
        # buffer and returned without z + (q - z).detach()) is flagged 2.
        if "st" not in ctx.disabled(self.i) and x is not None:
            if not x.requires_grad:
                if self.st_first_stage:
                    row[ST_NOGRAD_IN].fill_(1.0)
            elif qt is not None and qt.requires_grad:
                self._st_hooks(x, qt, ctx.clock.slot, ctx.clock.interval)
            elif qt is not None and self.st_first_stage and qt.is_floating_point():
                row[ST_NOGRAD_IN].fill_(2.0)

    def pre_snapshot(self, step: int) -> None:
        """Codebook and counts just before the cadence step's training forward (two copies)."""
        cb = self.q.codebook()
        if cb is None:
            return
        cbd = cb.detach()
        if self.pre_cb is None or self.pre_cb.shape != cbd.shape or self.pre_cb.device != cbd.device:
            self.pre_cb = cbd.float().clone()
        else:
            self.pre_cb.copy_(cbd)
        counts = self.q.counts()
        if counts is None or not counts.is_floating_point():
            self.pre_counts = None
        elif self.pre_counts is None or self.pre_counts.shape != counts.shape or self.pre_counts.device != counts.device:
            self.pre_counts = counts.detach().float().clone()
        else:
            self.pre_counts.copy_(counts.detach())
        self.pre_step = step

    def _forward_change(self, cbd: torch.Tensor, cnt: torch.Tensor | None, code_med: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(|change|_F of the codebook across this forward, rows replaced in it or None).

        Replacement is only counted for quantizers that replace codes (`q.replaces`). A row was
        replaced when it moved by more than JUMP_REL x the median code norm; or, being chosen by
        no input of the step, by more than JUMP_REL x its own norm; or when it moved at all while
        its count rose above both its count before the forward and its hits in this step. An EMA
        update `N' = d N + (1 - d) hits` does none of these (lucidrains resets a replaced code's
        count to the threshold, which a dead code's EMA never reaches). The tests that use this
        step's hits are skipped with several ranks, whose all-reduced hits this rank cannot see.
        """
        assert self.pre_cb is not None
        moved = torch.linalg.vector_norm(cbd.float() - self.pre_cb, dim=-1)          # [H, K]
        change = torch.linalg.vector_norm(moved)
        if not self.q.replaces or not self.cadence_seen:
            # the first training forward seen also runs lazy data-dependent inits (k-means),
            # which rewrite every row and its count: not replacements
            return change, None
        jumped = moved > JUMP_REL * code_med
        Hc, K = moved.shape
        hits: torch.Tensor | None = None
        if self.ctx.world_size == 1:
            hits = self.ctx.arena.count_rows[self.i][self.ctx.clock.slot].view(self.H, self.Kp)[:, :K]
            if hits.shape[0] != Hc:
                hits = hits.sum(0, keepdim=True) if Hc == 1 else None
        if hits is not None:
            # a code no input chose keeps its row under an EMA update (up to smoothing, a relative
            # change of at most 1 - decay): a jump of half its own length is a new vector
            pre_norm = torch.linalg.vector_norm(self.pre_cb, dim=-1)
            jumped = jumped | ((hits == 0) & (moved > JUMP_REL * pre_norm))
            pre = self.pre_counts
            if cnt is not None and pre is not None and pre.shape == cnt.shape == moved.shape:
                bound = torch.maximum(pre, hits.to(pre.dtype))
                reset = (cnt.float() > bound * (1 + COUNT_RESET_REL) + 1e-12) & (moved > 0)
                jumped = jumped | reset
        return change, jumped.sum(dtype=torch.float32)

    def _fingerprint(self, cbd: torch.Tensor) -> None:
        """Sampled rows and block sums of the codebook into this slot's fingerprint row."""
        ctx = self.ctx
        flat = cbd.float().reshape(-1, cbd.shape[-1])
        if self.fp_index is None or self.fp_index.device != flat.device:
            # built on the device by arithmetic (a host->device copy of the list would synchronise),
            # with the same float64 expression that gave `fp_rows` on the host
            m = len(self.fp_rows)
            self.fp_index = (torch.arange(m, device=flat.device, dtype=torch.float64) * self.fp_step).round().long()
        rows = flat.index_select(0, self.fp_index).reshape(-1)
        v = flat.reshape(-1)
        mb = v.numel() // FP_BLOCKS
        blocks = v[: mb * FP_BLOCKS].view(FP_BLOCKS, mb).sum(1) if mb else torch.zeros(FP_BLOCKS, device=v.device)
        out = ctx.arena.fp[self.i][ctx.clock.slot]
        if out.numel() == rows.numel() + FP_BLOCKS:
            out.copy_(torch.cat([rows, blocks]).to(ctx.device))

    def _geometry(self, zs: torch.Tensor, cb: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(nearest-code distance, code spacing, relative quantization error), medians, code space.

        Input rows are split into head slices (row r of a head-split input belongs to head
        r mod H) and compared with their head's codes; cosine codebooks compare l2-normalised
        vectors, as their lookup does.
        """
        H, K, D = cb.shape
        n = (min(zs.shape[0], NN_ROWS) // H) * H
        if n == 0:
            return None
        z = zs[:n].reshape(-1, H, D).transpose(0, 1)              # [H, n/H, D]
        if self.q.state.metric == "cosine":
            z = torch.nn.functional.normalize(z, dim=-1)
            cb = torch.nn.functional.normalize(cb, dim=-1)
        dmin = torch.cdist(z, cb).amin(-1)                       # [H, n/H]
        rel = (dmin / torch.linalg.vector_norm(z, dim=-1).clamp_min(1e-30)).median()
        if self.spacing_index is None or self.spacing_index.device != cb.device:
            # built on the device by arithmetic: a host->device copy of an index list would
            # synchronise; m <= K evenly spaced rows round to distinct indices
            m = min(K, SPACING_CODES)
            step = (K - 1) / max(m - 1, 1)
            self.spacing_index = (torch.arange(m, device=cb.device, dtype=torch.float64) * step).round().long()
            iu = torch.triu_indices(m, m, offset=1, device=cb.device)
            self.spacing_pairs = iu[0] * m + iu[1]
        sub = cb.index_select(1, self.spacing_index)               # [H, m, D]
        d = torch.cdist(sub, sub).reshape(H, -1).index_select(1, self.spacing_pairs)
        return dmin.median(), (d.median() if d.numel() else self.ctx.nan), rel

    def _st_hooks(self, x: torch.Tensor | None, qt: torch.Tensor, slot: int, interval: int) -> None:
        ctx = self.ctx
        grads: dict[str, torch.Tensor] = {}
        row = ctx.arena.stats[self.i][slot]

        # code space: the residual r = z - q (the value of x - qt), the direction of the
        # commitment term's gradient, so that the input gradient can be split into that term
        # and the rest (references to live tensors, dropped with the hooks)
        resid = (x.detach(), qt.detach()) if self.st_code_space and x is not None and x.shape == qt.shape else None

        def write(which: int, g: torch.Tensor) -> None:
            if ctx.clock.interval != interval:  # flushed meanwhile: the slot belongs to another step
                return
            with torch.no_grad():
                gf = g.detach().float()
                row[which].copy_(torch.linalg.vector_norm(gf))
                if which == ST_GIN and resid is not None and resid[0].shape == gf.shape:
                    r = resid[0].float() - resid[1].float()
                    row[ST_DOT_R:ST_RR + 1].copy_(torch.stack([(gf * r).sum(), (r * r).sum()]))
                other = grads.get("in" if which == ST_GOUT else "out")
                grads["out" if which == ST_GOUT else "in"] = g
                if other is not None and other.shape == g.shape:
                    row[ST_DOT].copy_((gf * other.detach().float()).sum())
                    grads.clear()

        h_out = qt.register_hook(ctx.guard(self.i, "st", lambda g: write(ST_GOUT, g)))
        self.tensor_handles.append(h_out)
        # |g_in| and <g_in, g_out> read 0 unless a gradient reaches the input: when the backward
        # never gets there (no path from the loss to the encoder), 0 is the truth
        row[ST_GIN:ST_DOT + 1].zero_()
        row[ST_DOT_R].zero_()
        if x is not None and x.requires_grad:
            h_in = x.register_hook(ctx.guard(self.i, "st", lambda g: write(ST_GIN, g)))
            self.tensor_handles.append(h_in)
        if len(self.tensor_handles) > 16:  # handles of tensors already freed: drop them
            del self.tensor_handles[:-16]

    # ---------------------------------------------------------------- eval / no_grad forwards

    def eval_pre(self) -> None:
        bufs = list(self.module_buffers())
        ident = [(id(b), b._version, tuple(b.shape)) for b in bufs]
        with torch.no_grad():
            snaps = [b.detach().clone() for b in bufs]
            cb = self.q.codebook()
            if cb is None:
                self.eval_cb = None
            elif self.eval_cb is None or self.eval_cb.shape != cb.shape or self.eval_cb.device != cb.device:
                self.eval_cb = cb.detach().float().clone()
            else:
                self.eval_cb.copy_(cb.detach())
        self.eval_before = (ident, snaps)

    def eval_post(self) -> None:
        before = self.eval_before
        self.eval_before = None
        if before is None:
            return
        ident, snaps = before
        bufs = list(self.module_buffers())
        ctx = self.ctx
        cell = ctx.arena.evalmut[self.i][ctx.clock.slot]
        with torch.no_grad():
            # how far this forward moved the codebook (0 when it did not), for comparison with a
            # training forward's move: evaluation data of another distribution moves it further
            cb = self.q.codebook()
            if cb is not None and self.eval_cb is not None and cb.shape == self.eval_cb.shape:
                diff = torch.nan_to_num(cb.detach().float() - self.eval_cb, nan=0.0, posinf=0.0, neginf=0.0)
                cell[EVM_CHANGE].add_(torch.linalg.vector_norm(diff))
        if len(bufs) != len(ident) or any(id(b) != i[0] or tuple(b.shape) != i[2] for b, i in zip(bufs, ident, strict=True)):
            self.host_evalmut[ctx.clock.step] = self.host_evalmut.get(ctx.clock.step, 0) + 1
            return
        if any(b._version != i[1] for b, i in zip(bufs, ident, strict=True)):
            self.host_evalmut[ctx.clock.step] = self.host_evalmut.get(ctx.clock.step, 0) + 1
            return
        if not bufs:
            return
        with torch.no_grad():
            changed = torch.stack([bits(b).ne(bits(s)).any() for b, s in zip(bufs, snaps, strict=True)]).any()
            cell[EVM_COUNT].add_(changed.to(torch.float32))
