"""The flush: host copies of one interval's slot buffers -> run-store records.

Pure host arithmetic (numpy, float64) over what the device accumulated: per-step usage and
windowed usage through the metrics core (`metrics.usage`), the cadence statistics read from the
stats rows, eval mutations, code-count histograms (`hist`, exact across ranks), fingerprints and
the run-wide rows. The only state kept between flushes is each quantizer's usage-window history
and histogram accumulator (`QuantizerTrack`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vqdoctor.live.arena import (
    BLOWUP_N,
    CODE_MAX,
    CODE_NORM,
    COUNT_SUM,
    DRIFT_NORM,
    EVM_CHANGE,
    EVM_COUNT,
    FWD_CHANGE,
    GN_CB,
    GN_DEC,
    GN_ENC,
    GN_QUANT,
    JUMPED,
    LOSS,
    NEAREST,
    NF_BUF,
    NF_GRAD,
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
)
from vqdoctor.metrics import usage as U

STEP_NAMES = ("tokens", "perplexity", "perplexity_fraction", "entropy_norm", "top1_share")
"""Per-step batch usage metrics of a step record."""


@dataclass
class QuantizerTrack:
    """What the flush keeps of one quantizer between intervals.

    Attributes:
        history: one `UsageWindow` per recent flush interval, oldest first (enough to reach W back).
        hist: code counts accumulated towards the next `hist` record.
        latest: the usage window ending at the last flushed step (`[H, K]`).
    """

    history: deque[U.UsageWindow] = field(default_factory=deque)
    hist: U.UsageWindow = field(default_factory=U.UsageWindow)
    latest: np.ndarray | None = None

    def windows(self, counts: np.ndarray, W: int) -> np.ndarray:
        """Counts over the last W steps ending at each step of the interval (`[n, H, K]`).

        Exact within the interval; earlier steps are taken in whole flush intervals, so a
        window spans W to W + F - 1 steps when it reaches back past the interval start.
        """
        n = counts.shape[0]
        cum = np.cumsum(counts, axis=0)
        prev = list(self.history)
        out = np.empty_like(cum)
        for j in range(n):
            covered = j + 1
            if covered >= W:
                lo = j - W
                out[j] = cum[j] - (cum[lo] if lo >= 0 else 0.0)
                continue
            acc = cum[j].copy()
            for w in reversed(prev):
                if covered >= W:
                    break
                if w.counts is not None and w.counts.shape == acc.shape:
                    acc += w.counts
                covered += w.steps
            out[j] = acc
        self.latest = out[-1] if n else None
        self.history.append(U.UsageWindow().update(counts, steps=n))
        total = sum(w.steps for w in self.history)
        while self.history and total - self.history[0].steps >= W:
            total -= self.history.popleft().steps
        return out


@dataclass
class QuantizerInterval:
    """One quantizer's part of a flush: its identity and the host copies of its slot rows.

    Attributes:
        name, kind, codebook_size (K), heads (H: index heads), levels: identity.
        state_heads: heads of the stored codebook (count_total is per head).
        replaces: the quantizer replaces dead codes (codes_replaced is recorded).
        st_code_space: input and output gradients live in the code space (st_grad_task_ratio).
        codebook_numel: elements of the live codebook (0: none), for RMS changes.
        counts: `[n, H, K]` code counts per step.
        stats: `[n, NST]` cadence statistics (NaN: not measured).
        evalmut: `[n, NEVM]` eval-mutation counters.
        host_evalmut: step -> eval mutations seen on the host (buffers re-registered).
        forwards: step -> training forwards whose indices were counted (several under gradient
            accumulation: the EMA statistics were updated once per forward).
        cadence_steps: the steps whose stats rows were written.
        dsteps: cadence step -> steps since the previous codebook snapshot.
        fingerprints: `[n, fp]` codebook fingerprints (None: single rank).
        fp_rows: the codebook rows sampled into a fingerprint.
        codebook_in_optimizer: 1/0 when the codebook is a Parameter that requires grad and an
            optimizer was seen, else None.
    """

    name: str
    kind: str
    codebook_size: int
    heads: int
    levels: tuple[int, ...] | None
    state_heads: int
    replaces: bool
    st_code_space: bool
    codebook_numel: int
    counts: np.ndarray
    stats: np.ndarray
    evalmut: np.ndarray
    host_evalmut: dict[int, int]
    forwards: dict[int, int]
    cadence_steps: set[int]
    dsteps: dict[int, int]
    fingerprints: np.ndarray | None = None
    fp_rows: list[int] = field(default_factory=list)
    codebook_in_optimizer: float | None = None


@dataclass
class RunInterval:
    """The run-wide part of a flush.

    Attributes:
        first_step: the interval's first step.
        run: `[n, NRUN]` run rows (loss on the device, gradient norms).
        loss_host: step -> loss given as a Python number.
        loss_device_steps: steps whose loss is in the run rows.
    """

    first_step: int
    run: np.ndarray
    loss_host: dict[int, float]
    loss_device_steps: set[int]


def interval_records(run: RunInterval, quantizers: list[tuple[QuantizerInterval, QuantizerTrack]],
                     window: int, hist_due: bool, encoder_learns: Callable[[], bool]) -> list[dict[str, Any]]:
    """The records of one flush interval: per step a `run` record and one `step` record per
    quantizer, plus `hist` records when due and `fp` records.

    Args:
        run: the run-wide rows.
        quantizers: each quantizer's interval and its track (updated: window history, hist).
        window: W, steps of the windowed usage.
        hist_due: write each quantizer's `hist` record (its accumulated counts) now.
        encoder_learns: whether an encoder that should learn sits before the quantizers (called
            only when a quantizer's input did not require grad).
    """
    n = run.run.shape[0]
    first = run.first_step
    steps = list(range(first, first + n))
    out: list[dict[str, Any]] = []
    per_step: dict[int, list[dict[str, Any]]] = {s: [] for s in steps}
    for q, track in quantizers:
        sm = U.usage_metrics(q.counts)
        wm = U.window_metrics(track.windows(q.counts, window))
        for j, s in enumerate(steps):
            rec: dict[str, Any] = {"t": "step", "step": s, "q": q.name}
            if sm["tokens"][j] > 0:
                rec.update({k: float(sm[k][j]) for k in STEP_NAMES})
                if q.forwards.get(s, 1) > 1:
                    rec["forwards"] = q.forwards[s]
                rec.update({k: float(wm[k][j]) for k in U.WINDOW_NAMES})
                rec["window_steps"] = window
            if s in q.cadence_steps:
                rec.update(cadence_metrics(q, q.stats[j], q.counts[j], s, encoder_learns))
            mut = float(q.evalmut[j, EVM_COUNT]) + q.host_evalmut.get(s, 0)
            if mut > 0 or s in q.cadence_steps:
                rec["eval_mutation"] = mut
            if mut > 0 and q.codebook_numel and q.evalmut[j, EVM_CHANGE] > 0:
                rec["eval_codebook_rms_change"] = float(q.evalmut[j, EVM_CHANGE]) / math.sqrt(q.codebook_numel) / mut
            if len(rec) > 3:
                per_step[s].append(rec)
        # FSQ / LFQ per-dimension usage over the latest window, on the interval's last step
        if track.latest is not None and track.latest.sum() > 0 and per_step[steps[-1]]:
            extra = U.implicit_usage(track.latest, q.kind, q.codebook_size, q.levels)
            for r in per_step[steps[-1]]:
                if r["q"] == q.name:
                    r.update(extra)
        track.hist.update(q.counts, steps=n, first_step=first, last_step=first + n - 1)
        if hist_due and track.hist.counts is not None:
            h = track.hist
            out.append({"t": "hist", "step": h.last_step, "q": q.name, "first_step": h.first_step,
                        "steps": h.steps, "window": window, "heads": q.heads,
                        "counts": [int(round(x)) for x in h.counts.reshape(-1)]})
            track.hist = U.UsageWindow()
        if q.fingerprints is not None:
            for j, s in enumerate(steps):
                if np.isfinite(q.fingerprints[j]).all():
                    out.append({"t": "fp", "step": s, "q": q.name, "rows": q.fp_rows,
                                "fingerprint": [float(x) for x in q.fingerprints[j]]})
    for j, s in enumerate(steps):
        r: dict[str, Any] = {"t": "run", "step": s}
        if s in run.loss_host:
            r["loss"] = run.loss_host[s]
        elif s in run.loss_device_steps:
            r["loss"] = float(run.run[j, LOSS])
        for k, col in (("grad_norm_encoder", GN_ENC), ("grad_norm_decoder", GN_DEC),
                       ("grad_norm_quantizer", GN_QUANT), ("nonfinite_grad", NF_GRAD)):
            v = float(run.run[j, col])
            if not math.isnan(v):
                r[k] = v
        if len(r) > 2:
            out.append(r)
        out.extend(per_step[s])
    return out


def cadence_metrics(q: QuantizerInterval, st: np.ndarray, counts: np.ndarray, s: int,
                    encoder_learns: Callable[[], bool]) -> dict[str, float]:
    """The cadence metrics of one quantizer at step `s` from its stats row (names: `metrics.names`)."""
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
    put("z_saturated", float(st[Z_SAT]))
    near, spacing = float(st[NEAREST]), float(st[SPACING])
    put("nearest_dist_median", near)
    put("intercode_dist_median", spacing)
    if not math.isnan(near) and not math.isnan(spacing) and spacing > 0:
        m["nearest_to_intercode"] = near / spacing
    put("nonfinite_input", float(st[NF_IN]))
    put("nonfinite_output", float(st[NF_OUT]))
    put("nonfinite_buffers", float(st[NF_BUF]))
    ds = q.dsteps.get(s)
    numel = max(q.codebook_numel, 1)
    if ds and q.codebook_numel and not math.isnan(float(st[DRIFT_NORM])):
        m["codebook_rms_change"] = float(st[DRIFT_NORM]) / math.sqrt(numel) / ds
    if q.codebook_numel and not math.isnan(float(st[FWD_CHANGE])):
        m["codebook_forward_rms_change"] = float(st[FWD_CHANGE]) / math.sqrt(numel)
        if q.replaces and not math.isnan(float(st[JUMPED])):
            m["codes_replaced"] = float(st[JUMPED])  # in the cadence step's own forward
    top, nblow = float(st[CODE_MAX]), float(st[BLOWUP_N])
    ref = max(c, z) if not math.isnan(z) else c  # as `metrics.device.blowup` chose it
    if not math.isnan(top) and not math.isnan(ref) and ref > 0:
        m["code_norm_max"] = top
        m["blowup_ratio"] = top / ref
        m["blowup_rows"] = nblow
    cs = float(st[COUNT_SUM])
    if not math.isnan(cs):
        m["count_total"] = cs / max(1, q.state_heads)
        # the EMA statistics follow the tokens of one update (one forward), not of the whole step
        per_forward = float(counts.sum()) / max(1, q.forwards.get(s, 1))
        if per_forward > 0:
            m["ema_count_sum_to_tokens"] = cs / per_forward
    m.update(_straight_through(q, st, encoder_learns))
    return m


def _straight_through(q: QuantizerInterval, st: np.ndarray, encoder_learns: Callable[[], bool]
                      ) -> dict[str, float]:
    """Gradient passthrough at the quantizer (from its backward hooks) and the codebook gradient."""
    m: dict[str, float] = {}
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
        m["st_code_space"] = 1.0 if q.st_code_space else 0.0
    elif float(st[ST_NOGRAD_IN]) == 2.0:
        # the input requires grad, the output does not: no task gradient can pass the quantizer
        m["st_grad_ratio"] = 0.0
        m["st_grad_passthrough"] = 0.0
        m["st_output_no_grad"] = 1.0
        m["st_code_space"] = 1.0 if q.st_code_space else 0.0
    elif float(st[ST_NOGRAD_IN]) == 1.0 and encoder_learns():
        # the quantizer's input does not require grad while an encoder that should learn
        # sits before it: nothing of the task gradient can reach the encoder through it
        m["st_grad_ratio"] = 0.0
        m["st_grad_passthrough"] = 0.0
        m["st_input_no_grad"] = 1.0
        m["st_code_space"] = 1.0 if q.st_code_space else 0.0
    gcb = float(st[GN_CB])
    if not math.isnan(gcb):
        m["grad_norm_codebook"] = gcb
        nf_grad += 0.0 if math.isfinite(gcb) else 1.0
    if not math.isnan(gout) or not math.isnan(gcb):
        m["nonfinite_grad"] = nf_grad
    if q.codebook_in_optimizer is not None:
        m["codebook_in_optimizer"] = q.codebook_in_optimizer
    return m
