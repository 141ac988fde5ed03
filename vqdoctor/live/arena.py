"""The device side of the watch: one flat buffer of per-step slots, and the clock that indexes it.

Every per-step and cadence statistic is written into a fixed cell of one float32 device buffer
(`Arena`), so a flush is one device->host copy and nothing in between reads a value on the host.
`Clock` maps the current step to its slot row (`step - interval_start`).
"""

from __future__ import annotations

import torch

# per-quantizer cadence columns; the forward-time block [0, N_FWD) is written with one copy
(Z_NORM, CODE_NORM, QERR, NF_IN, NF_OUT, NF_BUF, DRIFT_NORM, JUMPED, COUNT_SUM, NEAREST, SPACING,
 CODE_MAX, BLOWUP_N, FWD_CHANGE, Z_SPREAD, Z_SAT) = range(16)
N_FWD = 16
# straight-through (backward) and codebook-gradient columns
ST_GOUT, ST_GIN, ST_DOT, GN_CB, ST_NOGRAD_IN, ST_DOT_R, ST_RR = range(N_FWD, N_FWD + 7)
NST = N_FWD + 7
# eval-mutation columns (per quantizer and slot, zero-reset): changed forwards, sum of their
# codebook RMS changes
EVM_COUNT, EVM_CHANGE = 0, 1
NEVM = 2
# run-wide columns
LOSS, GN_ENC, GN_DEC, GN_QUANT, NF_GRAD = range(5)
NRUN = 5


class Clock:
    """The step clock: the current step, the first step of the current flush interval, and the
    interval's number (a hook that fires after a flush sees another interval and writes nothing).

    Args:
        start_step: number of the first step.
    """

    def __init__(self, start_step: int = 0):
        self.step = int(start_step)
        self.start_step = int(start_step)
        self.interval_start = self.step
        self.interval = 0

    @property
    def slot(self) -> int:
        """Row of the slot buffers that belongs to the current step."""
        return self.step - self.interval_start


class Arena:
    """One flat float32 device buffer holding every slot buffer, so a flush is one copy.

    Layout: [counts of all quantizers | eval-mutation counters] (reset to 0), then
    [run rows | stats rows of all quantizers | fingerprint rows] (reset to NaN). Fingerprints
    are taken at cadence steps, one row per slot, so ranks are compared at the cadence.

    Args:
        device: where the buffer lives (the codebooks' device).
        F: slots (steps per flush interval).
        widths: count columns per quantizer (H x (K + 1), with a junk bin per head).
        fp_sizes: fingerprint columns per quantizer (0: none).
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
        """Counters to 0, statistics to NaN (not measured)."""
        self.buf[: self.n_zero].zero_()
        self.buf[self.n_zero:].fill_(float("nan"))

    def host_view(self, host: object, t: torch.Tensor) -> object:
        """The part of a host copy of `buf` (a numpy array) that holds the device view `t`."""
        off = t.storage_offset() - self.buf.storage_offset()
        return host[off: off + t.numel()].reshape(tuple(t.shape))  # type: ignore[index]


def scalar(v: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor; most values already are one (no dispatch then)."""
    if isinstance(v, torch.Tensor):
        return v if v.dim() == 0 and v.dtype == torch.float32 else v.reshape(()).to(torch.float32)
    return torch.full((), float(v), device=device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (so NaN == NaN and -0.0 != 0.0 compare as stored)."""
    if t.is_floating_point() and t.element_size() in (2, 4, 8):
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t
