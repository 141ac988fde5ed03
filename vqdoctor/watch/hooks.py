"""The recorder: hooks on the quantizer modules, device-side accumulation, host-side flushes.

What runs when (per quantizer; K codes, H heads, F = flush_every, C = stats_every):

- **Every training forward** (forward hook; a forward is "training" when the module is in train
  mode and grad is enabled): the code indices are taken from the module's output (the first
  integer tensor found in it) and counted into the device row `counts[step % F]` with
  `torch.remainder` (folds -1 / out-of-range indices into a junk bin, so a bad index can never
  trigger a device-side assert) and one `scatter_add_`: **2 kernels** (+1 to offset heads,
  +1 to widen int32 indices). The slot index is a Python int: no synchronisation.
- **Every C steps** (cadence; first training forward of the step): the forward pre-hook copies
  the codebook and counts into persistent buffers; after the forward, median ||z_e|| and the
  input spread over the first `SAMPLE_ROWS` input vectors (deterministic; never consumes RNG),
  median code norm, largest row norm and rows above BLOWUP_FACTOR x the median (blow-ups),
  relative quantization error, non-finite counts of input / output / quantizer buffers, the
  codebook's change across this forward and the rows it replaced (compared with the pre-hook
  copy and the step's hits), EMA drift (distance to the snapshot of the previous cadence step),
  the sum of the EMA counts, and (several ranks) a fingerprint of the codebook; all written
  into the device rows `stats[step % F]` / `fp[step % F]`. Straight-through:
  `Tensor.register_hook` on the module's quantized output and on its input record |g_out|,
  |g_in|, <g_in, g_out> and, where the two live in the code space (`_st_layout`), <g_in, z - q>
  and |z - q|^2 (the commitment term's direction) during backward; an input that does not
  require grad is flagged instead. In the optimizer pre-step hook: gradient norms of
  encoder-side, quantizer and decoder-side parameters with `torch._foreach_norm` (0 for a side
  whose optimizer-held parameters got no gradient while another side did), and of each
  codebook Parameter.
- **Every forward in eval mode or under no_grad**: quantizer buffers are compared before and
  after the forward (Python version counters and object identity, plus a device comparison
  against a snapshot because libraries update buffers through `.data`, which bypasses version
  counters) and changed forwards are counted (`eval_mutation`), with how far they moved the
  codebook (`eval_codebook_rms_change`). Not counted as usage.
- **`doctor.step(loss=...)`**: a reference to the detached loss tensor is kept (no kernel, no
  `.item()`); the flush stacks the interval's losses into their rows in one copy. A Python
  float is kept on the host.
- **Every F steps** (flush): one device->host copy of the single flat buffer holding all of the
  above, then per-step metrics are computed on the host (perplexity, entropy, windowed usage,
  dead fraction, scale ratio, ...) and appended to the run store. The only synchronisation of
  the watch happens here.

Nothing in the per-step or cadence paths reads a tensor value on the host (`.item()`,
`.cpu()`, `.tolist()`, `bool(t)`), or creates a data-dependent shape (`unique`, `nonzero`,
boolean masks): every result stays a device tensor of fixed shape until the flush.

The code indices are the first integer tensor of the module's output, or the argmax of a float
`[..., K]` assignment tensor (one-hot encodings) when it returns none.

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

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from vqdoctor.watch import stats as S
from vqdoctor.watch.live import LiveQuantizer, ModuleIndex, contains_compiled
from vqdoctor.watch.store import RunStore, WatchWarning

# Input vectors used for cadence statistics: the first rows, in memory order (deterministic).
SAMPLE_ROWS = 4096
# Fingerprint (world size > 1): codebook rows sampled at fixed positions, and block sums.
FP_ROWS = 8
FP_BLOCKS = 16
# A codebook row "jumped" (was replaced) when it moved by more than this x the median code norm
# in one training forward (or, chosen by no input of the step, by this x its own norm).
JUMP_REL = 0.5

# Input rows compared with every code for the nearest-code distance, and codes (evenly spaced,
# fixed) whose pairwise distances give the typical code spacing: bounded work for any K.
NN_ROWS = 256
SPACING_CODES = 128

# A row is "blown up" when its norm exceeds this x the (usage-weighted) median code norm, as the
# checkpoint metric `blowup_rows` counts (metrics.codebook.BLOWUP_FACTOR).
BLOWUP_FACTOR = 100.0
# The median code norm is no reference for blow-ups when it is this small relative to the median
# of all rows: the codes in use sit at ~0 (an encoder output that is exactly 0 makes the origin
# the only live code), and every other row would read as blown up by 1e10.
NEAR_ZERO_REF = 1e-6
# A count that rises by more than this (relative) above max(count before, hits this step) in one
# forward was reset, not averaged: an EMA update lies between the two.
COUNT_RESET_REL = 1e-4

# per-quantizer cadence columns; the forward-time block [0, N_FWD) is written with one copy
(Z_NORM, CODE_NORM, QERR, NF_IN, NF_OUT, NF_BUF, DRIFT_NORM, JUMPED, COUNT_SUM, NEAREST, SPACING,
 CODE_MAX, BLOWUP_N, FWD_CHANGE, Z_SPREAD) = range(15)
N_FWD = 15
ST_GOUT, ST_GIN, ST_DOT, GN_CB, ST_NOGRAD_IN, ST_DOT_R, ST_RR = 15, 16, 17, 18, 19, 20, 21
NST = 22
# eval-mutation columns (per quantizer and slot, zero-reset): changed forwards, sum of their
# codebook RMS changes
EVM_COUNT, EVM_CHANGE = 0, 1
NEVM = 2
# run-wide columns
LOSS, GN_ENC, GN_DEC, GN_QUANT, NF_GRAD = range(5)
NRUN = 5

# projections that are safe to apply again on the side (no RNG, no state): evaluated functionally
_SAFE_PROJ = (nn.Linear, nn.LayerNorm, nn.Identity, nn.Sequential)


def _dynamo_disable(fn: Callable) -> Callable:
    """`torch._dynamo.disable(fn)`: a compiled model graph-breaks around the hook and runs it
    eagerly, also when the model is compiled after the watch started. Importing dynamo costs a
    second or two once per process (nothing when vector-quantize-pytorch or diffusers already
    imported it), which a training run can afford."""
    try:
        import torch._dynamo

        return torch._dynamo.disable(fn)
    except Exception:  # pragma: no cover - a torch build without dynamo
        return fn


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover
        return False


def find_tensor(obj: Any, want: Callable[[torch.Tensor], bool], depth: int = 0,
                path: tuple = ()) -> tuple[torch.Tensor, tuple] | None:
    """First tensor in a nested output (tuple, list, dict, dataclass, ModelOutput) satisfying `want`.

    Returns (tensor, path) where path replays the lookup with `follow`.
    """
    if depth > 6:
        return None
    if isinstance(obj, torch.Tensor):
        return (obj, path) if want(obj) else None
    if isinstance(obj, (tuple, list)):
        items: Iterable = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif hasattr(obj, "__dataclass_fields__"):
        items = ((f, getattr(obj, f, None)) for f in obj.__dataclass_fields__)
    else:
        return None
    for k, v in items:
        hit = find_tensor(v, want, depth + 1, (*path, k))
        if hit is not None:
            return hit
    return None


def follow(obj: Any, path: tuple) -> Any:
    """Replay a `find_tensor` path; None when it no longer fits."""
    for k in path:
        try:
            obj = obj[k] if isinstance(obj, (tuple, list, dict)) else getattr(obj, k)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return obj


def _is_index(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool and t.numel() > 0


def _functional_projection(proj: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A side-effect-free re-evaluation of a `project_in` made of Linear / LayerNorm / Identity.

    Calling the module itself would fire the user's hooks on it; anything else (dropout, custom
    code) might consume RNG or hold state, so such projections are not re-evaluated at all.
    """
    if proj is None:
        return None
    mods: list[nn.Module] = []
    stack = [proj]
    while stack:
        m = stack.pop(0)
        if isinstance(m, nn.Sequential):
            stack = list(m) + stack
            continue
        if not isinstance(m, _SAFE_PROJ):
            return None
        mods.append(m)

    def run(x: torch.Tensor) -> torch.Tensor:
        for m in mods:
            if isinstance(m, nn.Linear):
                x = torch.nn.functional.linear(x, m.weight, m.bias)
            elif isinstance(m, nn.LayerNorm):
                x = torch.nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        return x

    return run


class _Arena:
    """One flat float32 device buffer holding every slot buffer, so a flush is one copy.

    Layout: [counts of all quantizers | eval-mutation counters] (reset to 0), then
    [run rows | stats rows of all quantizers | fingerprint rows] (reset to NaN). Fingerprints
    are taken at cadence steps, one row per slot, so ranks are compared at the cadence.
    """

    def __init__(self, device: torch.device, F: int, widths: list[int], fp_sizes: list[int]):
        nq = len(widths)
        n_zero = sum(F * w for w in widths) + nq * F * NEVM
        n_nan = F * NRUN + nq * F * NST + sum(F * n for n in fp_sizes)
        self.n_zero = n_zero
        self.buf = torch.zeros(n_zero + n_nan, dtype=torch.float32, device=device)
        self.buf[n_zero:].fill_(float("nan"))
        off = 0
        self.counts: list[torch.Tensor] = []
        for w in widths:
            self.counts.append(self.buf[off: off + F * w].view(F, w))
            off += F * w
        self.evalmut: list[torch.Tensor] = []
        for _ in widths:
            self.evalmut.append(self.buf[off: off + F * NEVM].view(F, NEVM))
            off += F * NEVM
        self.run = self.buf[off: off + F * NRUN].view(F, NRUN)
        off += F * NRUN
        self.stats: list[torch.Tensor] = []
        for _ in widths:
            self.stats.append(self.buf[off: off + F * NST].view(F, NST))
            off += F * NST
        self.fp: list[torch.Tensor] = []
        for n in fp_sizes:
            self.fp.append(self.buf[off: off + F * n].view(F, n))
            off += F * n
        # per-slot views made once: indexing a tensor costs microseconds of Python per step
        self.count_rows = [list(c.unbind(0)) for c in self.counts]

    def _row_views(self, r: int) -> list[torch.Tensor]:
        return ([c[r] for c in self.counts] + [e[r] for e in self.evalmut] + [self.run[r]]
                + [st[r] for st in self.stats] + [f[r] for f in self.fp])

    def rows(self, r: int) -> list[torch.Tensor]:
        """Copies of every slot row `r` (to carry an unfinished step across a flush)."""
        return [v.clone() for v in self._row_views(r)]

    def set_rows(self, r: int, values: list[torch.Tensor]) -> None:
        """Write row copies made by `rows` into slot row `r`."""
        for v, x in zip(self._row_views(r), values, strict=True):
            v.copy_(x)

    def reset(self) -> None:
        self.buf[: self.n_zero].zero_()
        self.buf[self.n_zero:].fill_(float("nan"))


class _QProbe:
    """Per-quantizer state of the recorder (host side) and its device views."""

    def __init__(self, rec: Recorder, i: int, q: LiveQuantizer):
        self.rec = rec
        self.i = i
        self.q = q
        self.K = q.codebook_size
        self.Kp = self.K + 1  # + junk bin
        self.H = max(1, q.index_heads)
        self.width = self.H * self.Kp
        self.idx_path: tuple | None = None
        self.idx_onehot = False
        self.q_path: tuple | None = None
        self.in_path: tuple | None = None
        self.cadence_step = -1
        self.snap: torch.Tensor | None = None
        self.snap_step: int | None = None
        self.dsteps: dict[int, int] = {}        # cadence step -> steps since previous snapshot
        self.cadence_steps: set[int] = set()
        self.cadence_seen = False
        self.host_evalmut: dict[int, int] = {}
        self.eval_before: tuple[list, list[torch.Tensor | None]] | None = None
        self.offsets: torch.Tensor | None = None
        self.tensor_handles: list[Any] = []
        self.window_hist: deque[tuple[int, np.ndarray]] = deque()
        self.hist_acc: np.ndarray | None = None
        self.hist_first: int | None = None
        self.latest_window: np.ndarray | None = None
        self.project = _functional_projection(q.project_in)
        # the layout read from the state dict knows input projections the live module may keep
        # under other names (DAC's in_proj): without a module to apply, inputs are not in code space
        self.project_ok = (q.project_in is None and q.state.project_in is None) or self.project is not None
        self.fp_rows: list[int] = []
        cb = q.codebook()
        self.fp_size = 0
        self.fp_step = 1.0
        if cb is not None and rec.world_size > 1:
            n = cb.shape[0] * cb.shape[1]
            m = min(FP_ROWS, n)
            self.fp_step = (n - 1) / max(m - 1, 1)
            self.fp_rows = [round(j * self.fp_step) for j in range(m)]  # distinct: fp_step >= 1
            self.fp_size = len(self.fp_rows) * cb.shape[-1] + FP_BLOCKS
        self.fp_index: torch.Tensor | None = None
        self.spacing_index: torch.Tensor | None = None
        self.cf: bool | None = None
        self.layout_known = False
        self.spacing_pairs: torch.Tensor | None = None
        # codebook and counts just before the cadence step's training forward (persistent buffers)
        self.pre_cb: torch.Tensor | None = None
        self.pre_counts: torch.Tensor | None = None
        self.pre_step: int | None = None
        self.eval_cb: torch.Tensor | None = None
        # straight-through comparison: set by the recorder once every probe exists (`_st_layout`)
        self.st_code_space = False
        self.st_first_stage = True

    # ---------------------------------------------------------------- per forward (training)

    def count(self, output: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        """Count code indices of one training forward: remainder + scatter_add_ (2 kernels).

        The indices are the first integer tensor of the output; failing that, a float
        assignment tensor `[..., K]` (one-hot encodings, as the zalando / Sonnet-style modules
        return, or soft assignments) is read by its argmax (+1 kernel).
        """
        rec = self.rec
        if self.q.indices is not None:
            idx = self.q.indices(output)
        else:
            idx = follow(output, self.idx_path) if self.idx_path is not None else None
            if self.idx_onehot:
                idx = idx.argmax(-1) if isinstance(idx, torch.Tensor) and self._is_assignment(idx, None) else None
            if not isinstance(idx, torch.Tensor) or not _is_index(idx):
                hit = find_tensor(output, _is_index)
                self.idx_onehot = False
                if hit is None:
                    x = self._input(args, kwargs or {})
                    hit = find_tensor(output, lambda t: self._is_assignment(t, x))
                    self.idx_onehot = hit is not None
                if hit is None:
                    raise RuntimeError("no integer code indices found in the quantizer's output "
                                       "(register an adapter with an `indices` reader)")
                idx, self.idx_path = hit
                if self.idx_onehot:
                    idx = idx.argmax(-1)
        if idx is None:
            return
        if idx.device != rec.device:
            idx = idx.to(rec.device, non_blocking=True)
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
        rec.arena.count_rows[self.i][rec.slot].scatter_add_(0, flat, rec.one.expand(flat.shape[0]))

    def _is_assignment(self, t: torch.Tensor, x: torch.Tensor | None) -> bool:
        """A float `[..., K]` tensor that can only be per-vector code assignments (one head)."""
        return (self.H == 1 and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == self.K
                and self.K > 1 and (x is None or t.shape != x.shape))

    # ---------------------------------------------------------------- cadence (forward)

    def _input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        src = (args, kwargs)
        if self.in_path is not None:
            x = follow(src, self.in_path)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return x
        hit = find_tensor(src, lambda t: t.is_floating_point() and t.dim() >= 2)
        if hit is None:
            return None
        self.in_path = hit[1]
        return hit[0]

    def _quantized(self, output: Any, x: torch.Tensor | None) -> torch.Tensor | None:
        if self.q.quantized is not None:
            return self.q.quantized(output)
        if x is None:
            return None
        if self.q_path is not None:
            t = follow(output, self.q_path)
            if isinstance(t, torch.Tensor) and t.shape == x.shape and t.is_floating_point():
                return t
        hit = find_tensor(output, lambda t: t.is_floating_point() and t.shape == x.shape)
        if hit is None:
            return None
        self.q_path = hit[1]
        return hit[0]

    def _layout(self, x: torch.Tensor, idx: torch.Tensor | None) -> bool | None:
        """True when x is channels-first ([B, D, ...]), False when channels-last, None when unknown.

        Decided once per quantizer: from the index tensor's shape (it is x's shape without the
        vector axis) when that settles it, else from which axis has the input dimension, else
        from the library's convention.
        """
        if self.layout_known:
            return self.cf
        d = self.q.input_dim or x.shape[-1]
        cf: bool | None = None
        if idx is not None and x.dim() >= 3:
            shape = tuple(idx.shape[:-1]) if self.H > 1 and idx.dim() and idx.shape[-1] == self.H else tuple(idx.shape)
            last, first = tuple(x.shape[:-1]), (x.shape[0], *x.shape[2:])
            if shape == last and shape != first and x.shape[-1] == d:
                cf = False
            elif shape == first and shape != last and x.shape[1] == d:
                cf = True
        if cf is None:
            on_last, on_first = x.shape[-1] == d, x.dim() >= 3 and x.shape[1] == d
            if on_last != on_first:
                cf = on_first
            elif on_last:
                cf = bool(self.q.channel_first)
        self.cf, self.layout_known = cf, True
        return cf

    def _rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The first SAMPLE_ROWS input vectors as [n, input_dim] (a view or a small copy)."""
        d = self.q.input_dim or x.shape[-1]
        if x.dim() < 2 or self.cf is None:
            return None
        axis = 1 if self.cf else x.dim() - 1
        if x.shape[axis] != d:
            return None
        per_b = max(1, x[0].numel() // d)
        b = min(x.shape[0], -(-SAMPLE_ROWS // per_b))
        xb = x[:b].movedim(1, -1) if self.cf else x[:b]
        return xb.reshape(-1, d)[:SAMPLE_ROWS]

    def cadence_forward(self, args: tuple, kwargs: dict, output: Any, step: int) -> None:
        """Scale, error, non-finite, drift and count statistics of a cadence step (one copy)."""
        rec = self.rec
        nan = rec.nan
        vals: list[torch.Tensor] = [nan] * N_FWD
        x = self._input(args, kwargs)
        qt = self._quantized(output, x)
        D = self.q.code_dim
        zs: torch.Tensor | None = None
        if x is not None and not self.layout_known:
            idx = follow(output, self.idx_path) if self.idx_path is not None else None
            if self.idx_onehot and isinstance(idx, torch.Tensor) and idx.dim():
                idx = idx[..., 0]  # only the shape is read: the vectors' axes, without the K axis
            self._layout(x, idx if isinstance(idx, torch.Tensor) else None)
        xs = self._rows(x) if x is not None else None
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
                vals[Z_SPREAD] = _input_spread(zs, self.q.state.metric == "cosine")
            else:
                # before an input map we cannot evaluate (DAC's in_proj, a Gumbel head): the
                # module's own input vectors; a collapsed input is collapsed on either side
                vals[Z_SPREAD] = _input_spread(xs, False)
            if qt is not None:
                qs = self._rows(qt)
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
            code_med = _code_norm_median(cbd, cnt, norms)
            vals[CODE_NORM] = code_med
            vals[CODE_MAX], vals[BLOWUP_N] = _blowup(norms, code_med, vals[Z_NORM], nan)
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
        bufs = self.rec.buffers_of[self.i]
        if bufs:
            total = sum(b.numel() for b in bufs)
            finite = torch.stack([torch.isfinite(b.detach()).sum(dtype=torch.float32) for b in bufs]).sum()
            vals[NF_BUF] = total - finite
        if counts is not None:
            vals[COUNT_SUM] = counts.detach().sum(dtype=torch.float32)
        row = rec.arena.stats[self.i][rec.slot]
        row[:N_FWD].copy_(torch.stack([_scalar(v, rec.device) for v in vals]))
        self.cadence_steps.add(step)
        self.cadence_seen = True
        # straight-through passthrough: gradient hooks on this forward's output and input. An
        # input that does not require grad (the encoder output was detached, or no encoder) is
        # flagged; the flush decides whether an encoder that should learn is behind it.
        if "st" not in rec.disabled_for(self) and x is not None:
            if not x.requires_grad:
                if self.st_first_stage:
                    row[ST_NOGRAD_IN].fill_(1.0)
            elif qt is not None and qt.requires_grad:
                self._st_hooks(x, qt, rec.slot, rec.interval)

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
        if self.rec.world_size == 1:
            hits = self.rec.arena.count_rows[self.i][self.rec.slot].view(self.H, self.Kp)[:, :K]
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
        rec = self.rec
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
        out = rec.arena.fp[self.i][rec.slot]
        if out.numel() == rows.numel() + FP_BLOCKS:
            out.copy_(torch.cat([rows, blocks]).to(rec.device))

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
        return dmin.median(), (d.median() if d.numel() else self.rec.nan), rel

    def _st_hooks(self, x: torch.Tensor | None, qt: torch.Tensor, slot: int, interval: int) -> None:
        rec = self.rec
        grads: dict[str, torch.Tensor] = {}
        row = rec.arena.stats[self.i][slot]

        # code space: the residual r = z - q (the value of x - qt), the direction of the
        # commitment term's gradient, so that the input gradient can be split into that term
        # and the rest (references to live tensors, dropped with the hooks)
        resid = (x.detach(), qt.detach()) if self.st_code_space and x is not None and x.shape == qt.shape else None

        def write(which: int, g: torch.Tensor) -> None:
            if rec.interval != interval:  # flushed meanwhile: the slot belongs to another step
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

        h_out = qt.register_hook(rec.guard(self, "st", lambda g: write(ST_GOUT, g)))
        self.tensor_handles.append(h_out)
        # |g_in| and <g_in, g_out> read 0 unless a gradient reaches the input: when the backward
        # never gets there (no path from the loss to the encoder), 0 is the truth
        row[ST_GIN:ST_DOT + 1].zero_()
        row[ST_DOT_R].zero_()
        if x is not None and x.requires_grad:
            h_in = x.register_hook(rec.guard(self, "st", lambda g: write(ST_GIN, g)))
            self.tensor_handles.append(h_in)
        if len(self.tensor_handles) > 16:  # handles of tensors already freed: drop them
            del self.tensor_handles[:-16]

    # ---------------------------------------------------------------- eval / no_grad forwards

    def eval_pre(self) -> None:
        bufs = list(self.rec.module_buffers(self.i))
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
        bufs = list(self.rec.module_buffers(self.i))
        rec = self.rec
        cell = rec.arena.evalmut[self.i][rec.slot]
        with torch.no_grad():
            # how far this forward moved the codebook (0 when it did not), for comparison with a
            # training forward's move: evaluation data of another distribution moves it further
            cb = self.q.codebook()
            if cb is not None and self.eval_cb is not None and cb.shape == self.eval_cb.shape:
                diff = torch.nan_to_num(cb.detach().float() - self.eval_cb, nan=0.0, posinf=0.0, neginf=0.0)
                cell[EVM_CHANGE].add_(torch.linalg.vector_norm(diff))
        if len(bufs) != len(ident) or any(id(b) != i[0] or tuple(b.shape) != i[2] for b, i in zip(bufs, ident, strict=True)):
            self.host_evalmut[rec.step] = self.host_evalmut.get(rec.step, 0) + 1
            return
        if any(b._version != i[1] for b, i in zip(bufs, ident, strict=True)):
            self.host_evalmut[rec.step] = self.host_evalmut.get(rec.step, 0) + 1
            return
        if not bufs:
            return
        with torch.no_grad():
            changed = torch.stack([_bits(b).ne(_bits(s)).any() for b, s in zip(bufs, snaps, strict=True)]).any()
            cell[EVM_COUNT].add_(changed.to(torch.float32))


def _scalar(v: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor; most values already are one (no dispatch then)."""
    if isinstance(v, torch.Tensor):
        return v if v.dim() == 0 and v.dtype == torch.float32 else v.reshape(()).to(torch.float32)
    return torch.full((), float(v), device=device)


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lower weighted median on the device, without a host read (NaN when no weight is positive).

    The smallest v_i with sum_{v_j <= v_i} w_j >= sum_j w_j / 2, as
    `metrics.functional.weighted_median`; equal weights give the lower median (`torch.median`).
    Entries with a non-finite value or weight, or a weight <= 0, take no part.
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


def _code_norm_median(cb: torch.Tensor, counts: torch.Tensor | None,
                      norms: torch.Tensor | None = None) -> torch.Tensor:
    """`code_norm_median` as the checkpoint metrics define it, computed on the device.

    Finite, non-zero rows; with EMA counts each code weighs min(N_i, n/K) of its head (the scale
    of the codes in use, `metrics.codebook.usage_weights`), else all weigh the same.
    """
    if norms is None:
        norms = torch.linalg.vector_norm(cb.float(), dim=-1)             # [H, K]
    ok = torch.isfinite(norms) & (norms > 0)
    if counts is not None and counts.shape == norms.shape:
        c = torch.nan_to_num(counts.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
        w = torch.minimum(c, c.sum(-1, keepdim=True) / max(int(c.shape[-1]), 1))
    else:
        w = torch.ones_like(norms, dtype=torch.float64)
    return _weighted_median(norms, torch.where(ok, w, torch.zeros_like(w)))


def _input_spread(z: torch.Tensor, cosine: bool) -> torch.Tensor:
    """`z_spread` as `metrics.probe.input_spread` defines it, on the device (no host read):
    median |z_i - mean z| / median |z_i| in float64 (cosine: of l2-normalised rows); the RMS
    norm is the unit when the median norm is 0, and all-zero inputs have spread 0."""
    v = z.detach().to(torch.float64)
    if cosine:
        v = torch.nn.functional.normalize(v, dim=-1)
    norms = torch.linalg.vector_norm(v, dim=-1)
    unit = norms.median()
    unit = torch.where(unit > 0, unit, norms.pow(2).mean().sqrt())
    dev = torch.linalg.vector_norm(v - v.mean(0), dim=-1).median()
    return torch.where(unit > 0, dev / torch.where(unit > 0, unit, torch.ones_like(unit)),
                       torch.zeros_like(unit)).to(torch.float32)


def _blowup(norms: torch.Tensor, code_med: torch.Tensor, z_med: torch.Tensor, nan: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest finite row norm, rows above BLOWUP_FACTOR x the reference), on the device.

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


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (so NaN == NaN and -0.0 != 0.0 compare as stored)."""
    if t.is_floating_point() and t.element_size() in (2, 4, 8):
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


class Recorder:
    """Attaches the hooks to a model and turns what they see into run-store records.

    Args:
        model: the model (wrappers looked through).
        quantizers: the live quantizers (`live.find_quantizers`).
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
        self.step = int(start_step)
        self.start_step = int(start_step)
        self.interval_start = self.step
        self.interval = 0
        self.explicit = False
        self.pending = False
        self.fwd_since_advance = False
        self.step_has_data = False
        self.fwd_step = self.step
        self.grad_step = -1
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
        self.one = torch.ones((), device=self.device)
        self.zero = torch.zeros((), device=self.device)
        self.nan = torch.full((), float("nan"), device=self.device)
        self.probes = [_QProbe(self, i, q) for i, q in enumerate(quantizers)]
        self.arena = _Arena(self.device, self.F, [p.width for p in self.probes], [p.fp_size for p in self.probes])
        self.buffers_of = [self._nonfinite_targets(q) for q in quantizers]
        self._mod_buffers: list[list[tuple[nn.Module, str]]] = [self._buffer_refs(q) for q in quantizers]
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
                               and not extra and last)

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

    def _buffer_refs(self, q: LiveQuantizer) -> list[tuple[nn.Module, str]]:
        out = []
        for m in q.module.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    out.append((m, name))
        return out

    def module_buffers(self, i: int) -> Iterable[torch.Tensor]:
        """The quantizer's buffers, read from their owners now (follows re-registration)."""
        for m, name in self._mod_buffers[i]:
            b = m._buffers.get(name)
            if b is not None:
                yield b

    def _nonfinite_targets(self, q: LiveQuantizer) -> list[torch.Tensor]:
        out = [b for b in q.module.buffers() if b.is_floating_point()]
        if q.codebook_param is not None and all(q.codebook_param is not b for b in out):
            out.append(q.codebook_param)
        return out

    # ------------------------------------------------------------------ guards

    def disabled_for(self, probe: _QProbe | None) -> set[str]:
        i = -1 if probe is None else probe.i
        return {k for (j, k) in self._disabled if j == i}

    def guard(self, probe: _QProbe | None, what: str, fn: Callable) -> Callable:
        """`fn` wrapped so that an exception disables this probe instead of reaching the training."""
        key = (-1 if probe is None else probe.i, what)

        def guarded(*args: Any, **kwargs: Any) -> None:
            if self.closed or key in self._disabled or _is_compiling():
                return None
            try:
                fn(*args, **kwargs)
            except Exception as e:  # never let a probe break the training
                self.fail(key, e)
            return None

        return _dynamo_disable(guarded)

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
            self._handles.append(m.register_forward_pre_hook(self.guard(p, "pre", self._pre(p)), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self.guard(p, "post", self._post(p)), with_kwargs=True))
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._handles.append(register_optimizer_step_pre_hook(self.guard(None, "grad", self._opt_pre)))
        self._handles.append(register_optimizer_step_post_hook(self.guard(None, "clock", self._opt_post)))
        if not self.compiled:
            # one-time trace of the order modules run in, for the encoder/decoder split
            qmods = {id(p.q.module) for p in self.probes}
            for m in self.model.modules():
                if m._parameters and id(m) not in qmods:
                    self._trace_handles.append(m.register_forward_pre_hook(self.guard(None, "trace", self._tracer(m))))

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

    def _pre(self, p: _QProbe) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._first_q_pos is None:
                # any mode: an evaluation pass before training runs the modules in the same order
                self._first_q_pos = len(self._trace_order)
            if module.training and torch.is_grad_enabled():
                if self.pending and not self.explicit:
                    self.pending = False
                    self._advance()
                if self.step % self.C == 0 and p.cadence_step != self.step and p.pre_step != self.step:
                    off = self.disabled_for(p)
                    if "stats" not in off and "pre" not in off:
                        with torch.no_grad():
                            p.pre_snapshot(self.step)
            elif "eval" not in self.disabled_for(p):
                try:
                    p.eval_pre()
                except Exception as e:
                    self.fail((p.i, "eval"), e)
        return pre

    def _post(self, p: _QProbe) -> Callable:
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
            off = self.disabled_for(p)
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
        return self.step - self.interval_start

    # ------------------------------------------------------------------ optimizer hooks

    def _owns(self, opt: torch.optim.Optimizer) -> bool:
        n = sum(len(g["params"]) for g in opt.param_groups)
        cached = self._opt_owner.get(id(opt))
        if cached is not None and cached[0] == n:
            return cached[1]
        model_ids = {id(p) for p in self.model.parameters()}
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        owns = bool(ids & model_ids)
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
        if self.explicit or not self.fwd_since_advance or not self._owns(opt):
            return
        self.pending = True

    def _encoder_learns(self) -> bool:
        """True when encoder-side parameters require grad and a stepping optimizer holds them."""
        if self._first_q_pos is None and self._sides is None:
            return False
        enc = self._side_lists()[0]
        return any(p.requires_grad and id(p) in self._opt_param_ids for p in enc)

    def _side_lists(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(encoder-side, quantizer, decoder-side) parameters, decided once.

        Modules that ran before the first quantizer in the first forward are encoder-side, the
        rest decoder-side; modules never seen running (or a compiled model, where the trace is
        skipped) fall back to registration order relative to the first quantizer.
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

    def _host_views(self, host: np.ndarray, n: int) -> Callable[[torch.Tensor], np.ndarray]:
        base = self.arena.buf

        def view(t: torch.Tensor) -> np.ndarray:
            off = t.storage_offset() - base.storage_offset()
            return host[off: off + t.numel()].reshape(tuple(t.shape))
        return view

    def _records(self, host: np.ndarray, n: int, final: bool) -> list[dict[str, Any]]:
        view = self._host_views(host, n)
        first = self.interval_start
        steps = list(range(first, first + n))
        run = view(self.arena.run)[:n]
        out: list[dict[str, Any]] = []
        per_step: dict[int, list[dict[str, Any]]] = {s: [] for s in steps}

        counts_of = {p.i: view(self.arena.counts[p.i])[:n].reshape(n, p.H, p.Kp)[:, :, : p.K].astype(np.float64)
                     for p in self.probes}
        if self.window_steps is None:
            # one window for the whole run: the longest any quantizer needs
            ws = []
            for p in self.probes:
                tok = counts_of[p.i].sum(-1).mean(-1)
                tok = tok[tok > 0]
                if len(tok):
                    ws.append(S.auto_window(p.K, p.H, float(np.median(tok))))
            if ws:
                self.window_steps = max(ws)
                self.store.meta.setdefault("config", {})["window"] = self.window_steps
                self.store.write_meta()
        W = self.window_steps or S.WINDOW_MIN

        for p in self.probes:
            counts_all = counts_of[p.i]
            stats = view(self.arena.stats[p.i])[:n]
            evm = view(self.arena.evalmut[p.i])[:n]
            cb_now = p.q.codebook()
            cb_numel = int(cb_now.numel()) if cb_now is not None else 0
            fps = view(self.arena.fp[p.i])[:n] if p.fp_size else None
            sm = S.step_metrics(counts_all)
            win = self._windows(p, counts_all, W)
            wm = S.window_metrics(win)
            for j, s in enumerate(steps):
                rec: dict[str, Any] = {"t": "step", "step": s, "q": p.q.name}
                tok = sm["tokens"][j]
                if tok > 0:
                    for k in ("tokens", "perplexity", "perplexity_fraction", "entropy_norm", "top1_share"):
                        rec[k] = float(sm[k][j])
                    for k in ("usage_window", "usage_fraction", "dead_fraction", "entropy_norm_window",
                              "perplexity_window", "window_tokens"):
                        rec[k] = float(wm[k][j])
                    rec["window_steps"] = W
                if s in p.cadence_steps:
                    rec.update(self._cadence_metrics(p, stats[j], counts_all[j], s))
                mut = float(evm[j, EVM_COUNT]) + p.host_evalmut.get(s, 0)
                if mut > 0 or s in p.cadence_steps:
                    rec["eval_mutation"] = mut
                if mut > 0 and cb_numel and evm[j, EVM_CHANGE] > 0:
                    rec["eval_codebook_rms_change"] = float(evm[j, EVM_CHANGE]) / math.sqrt(cb_numel) / mut
                if len(rec) > 3:
                    per_step[s].append(rec)
            # FSQ / LFQ per-dimension usage over the latest window, on the interval's last step
            if p.latest_window is not None and p.latest_window.sum() > 0:
                extra: dict[str, float] = {}
                if p.q.state.kind == "fsq" and p.q.state.levels:
                    extra = S.fsq_metrics(p.latest_window, tuple(p.q.state.levels))
                elif p.q.state.kind == "lfq":
                    extra = S.lfq_metrics(p.latest_window, int(round(math.log2(p.K))) if p.K > 1 else 0)
                if extra and per_step[steps[-1]]:
                    for r in per_step[steps[-1]]:
                        if r["q"] == p.q.name:
                            r.update(extra)
            p.cadence_steps = {s for s in p.cadence_steps if s >= first + n}
            p.host_evalmut = {k: v for k, v in p.host_evalmut.items() if k >= first + n}
            p.dsteps = {k: v for k, v in p.dsteps.items() if k >= first + n}
            # hist records (exact cross-rank aggregation)
            interval_sum = counts_all.sum(0)
            p.hist_acc = interval_sum if p.hist_acc is None else p.hist_acc + interval_sum
            if p.hist_first is None:
                p.hist_first = first
            last = first + n - 1
            if (last + 1 - self.start_step) % self.hist_every == 0 or final:
                out.append({"t": "hist", "step": last, "q": p.q.name, "first_step": p.hist_first,
                            "steps": last - p.hist_first + 1, "window": W, "heads": p.H,
                            "counts": [int(round(x)) for x in p.hist_acc.reshape(-1)]})
                p.hist_acc, p.hist_first = None, None
            if fps is not None:
                for j, s in enumerate(steps):
                    if np.isfinite(fps[j]).all():
                        out.append({"t": "fp", "step": s, "q": p.q.name, "rows": p.fp_rows,
                                    "fingerprint": [float(x) for x in fps[j]]})

        for j, s in enumerate(steps):
            r: dict[str, Any] = {"t": "run", "step": s}
            if s in self._loss_host:
                r["loss"] = self._loss_host[s]
            elif s in self._loss_dev_steps:
                r["loss"] = float(run[j, LOSS])
            for k, col in (("grad_norm_encoder", GN_ENC), ("grad_norm_decoder", GN_DEC),
                           ("grad_norm_quantizer", GN_QUANT), ("nonfinite_grad", NF_GRAD)):
                v = float(run[j, col])
                if not math.isnan(v):
                    r[k] = v
            if len(r) > 2:
                out.append(r)
            out.extend(per_step[s])
        return out

    def _windows(self, p: _QProbe, counts: np.ndarray, W: int) -> np.ndarray:
        """Counts over the last W steps ending at each step of the interval.

        Exact within the interval; earlier steps are taken in whole flush intervals, so a
        window spans W to W + F - 1 steps when it reaches back past the interval start.
        """
        n = counts.shape[0]
        cum = np.cumsum(counts, axis=0)
        prev = list(p.window_hist)  # oldest first: (steps, sum)
        out = np.empty_like(cum)
        for j in range(n):
            covered = j + 1
            if covered >= W:
                lo = j - W
                out[j] = cum[j] - (cum[lo] if lo >= 0 else 0.0)
                continue
            acc = cum[j].copy()
            for steps_k, sum_k in reversed(prev):
                if covered >= W:
                    break
                acc += sum_k
                covered += steps_k
            out[j] = acc
        p.latest_window = out[-1] if n else None
        p.window_hist.append((n, counts.sum(0)))
        total = sum(k for k, _ in p.window_hist)
        while p.window_hist and total - p.window_hist[0][0] >= W:
            total -= p.window_hist[0][0]
            p.window_hist.popleft()
        return out

    def _cadence_metrics(self, p: _QProbe, st: np.ndarray, counts: np.ndarray, s: int) -> dict[str, float]:
        m: dict[str, float] = {}

        def put(name: str, v: float) -> None:
            if not math.isnan(v):
                m[name] = float(v)

        z, c = float(st[Z_NORM]), float(st[CODE_NORM])
        put("z_norm_median", z)
        put("code_norm_median", c)
        if not math.isnan(z) and not math.isnan(c):
            m["scale_ratio"] = z / c if c > 0 else float("inf")
        put("quant_error_rel", float(st[QERR]))
        put("z_spread", float(st[Z_SPREAD]))
        near, spacing = float(st[NEAREST]), float(st[SPACING])
        put("nearest_dist_median", near)
        put("intercode_dist_median", spacing)
        if not math.isnan(near) and not math.isnan(spacing) and spacing > 0:
            m["nearest_to_intercode"] = near / spacing
        put("nonfinite_input", float(st[NF_IN]))
        put("nonfinite_output", float(st[NF_OUT]))
        put("nonfinite_buffers", float(st[NF_BUF]))
        ds = p.dsteps.get(s)
        cb = p.q.codebook()
        numel = max(int(cb.numel()), 1) if cb is not None else 1
        if ds and cb is not None and not math.isnan(float(st[DRIFT_NORM])):
            m["codebook_rms_change"] = float(st[DRIFT_NORM]) / math.sqrt(numel) / ds
        if cb is not None and not math.isnan(float(st[FWD_CHANGE])):
            m["codebook_forward_rms_change"] = float(st[FWD_CHANGE]) / math.sqrt(numel)
            if p.q.replaces and not math.isnan(float(st[JUMPED])):
                m["codes_replaced"] = float(st[JUMPED])  # in the cadence step's own forward
        top, nblow = float(st[CODE_MAX]), float(st[BLOWUP_N])
        ref = max(c, z) if not math.isnan(z) else c  # as `_blowup` chose it on the device
        if not math.isnan(top) and not math.isnan(ref) and ref > 0:
            m["code_norm_max"] = top
            m["blowup_ratio"] = top / ref
            m["blowup_rows"] = nblow
        cs = float(st[COUNT_SUM])
        if not math.isnan(cs):
            m["count_total"] = cs / max(1, p.q.state.heads)
            total_idx = float(counts.sum())
            if total_idx > 0:
                m["ema_count_sum_to_tokens"] = cs / total_idx
        gout, gin, dot = float(st[ST_GOUT]), float(st[ST_GIN]), float(st[ST_DOT])
        nf_grad = 0.0
        if not math.isnan(gout):
            nf_grad += 0.0 if math.isfinite(gout) else 1.0
            if not math.isnan(gin):
                nf_grad += 0.0 if math.isfinite(gin) else 1.0
                m["st_grad_ratio"] = gin / gout if gout > 0 else (0.0 if gin == 0 else float("inf"))
                if not math.isnan(dot):
                    den = gin * gout
                    m["st_grad_cos"] = dot / den if den > 0 else 0.0
                    if gout > 0 and math.isfinite(gout) and math.isfinite(dot):
                        m["st_grad_passthrough"] = dot / gout / gout
                dot_r, rr = float(st[ST_DOT_R]), float(st[ST_RR])
                if gout > 0 and math.isfinite(gout) and math.isfinite(gin) and not math.isnan(dot_r):
                    # the input gradient without its component along z - q (the commitment term)
                    along = dot_r * dot_r / rr if rr > 0 and math.isfinite(rr) else 0.0
                    m["st_grad_task_ratio"] = math.sqrt(max(gin * gin - along, 0.0)) / gout
            m["st_code_space"] = 1.0 if p.st_code_space else 0.0
        elif float(st[ST_NOGRAD_IN]) == 1.0 and self._encoder_learns():
            # the quantizer's input does not require grad while an encoder that should learn
            # sits before it: nothing of the task gradient can reach the encoder through it
            m["st_grad_ratio"] = 0.0
            m["st_grad_passthrough"] = 0.0
            m["st_input_no_grad"] = 1.0
            m["st_code_space"] = 1.0 if p.st_code_space else 0.0
        gcb = float(st[GN_CB])
        if not math.isnan(gcb):
            m["grad_norm_codebook"] = gcb
            nf_grad += 0.0 if math.isfinite(gcb) else 1.0
        if not math.isnan(gout) or not math.isnan(gcb):
            m["nonfinite_grad"] = nf_grad
        prm = p.q.codebook_param
        if prm is not None and prm.requires_grad and self._opt_owner:
            m["codebook_in_optimizer"] = 1.0 if id(prm) in self._opt_param_ids else 0.0
        return m
