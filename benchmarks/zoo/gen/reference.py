"""Reference measurements of a training run, independent of vqdoctor.

Everything here is computed by the training script itself from what the quantizer returned and
from its own tensors: usage and perplexity from the integer indices, the loss, the task
gradient at the quantizer's input (`torch.autograd.grad` of the task loss alone), codebook
movement (after initialisation, during evaluation passes, rows replaced per step), code and
input norms, duplicate rows, non-finite counts. `Recorder.result()` is what `reference.json`
holds; `confirm.py` reads it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    p = counts.double() / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def _f(x: Any) -> float | None:
    """A float for JSON (None for NaN, a large sentinel sign for inf)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if math.isnan(v):
        return None
    if math.isinf(v):
        return 1e300 if v > 0 else -1e300
    return v


class Recorder:
    """Per-step measurements of one run (stage 0 carries the codebook metrics)."""

    def __init__(self, K: int, stages: int, steps: int, window: int = 20, every: int = 5):
        self.K, self.stages, self.steps, self.window, self.every = K, stages, steps, window, every
        self.win: list[deque] = [deque(maxlen=window) for _ in range(stages)]
        self.ever = torch.zeros(stages, K, dtype=torch.long)
        self.first = torch.zeros(stages, K, dtype=torch.long)
        self.loss: list[float | None] = []
        self.task: list[float | None] = []
        self.ppl: list[float] = []
        self.grad: list[tuple[int, float]] = []
        self.cadence: list[dict[str, Any]] = []
        self.nonfinite = {"loss_steps": 0, "z": 0, "codebook": 0, "first_step": None}
        self.cb_init: torch.Tensor | None = None
        self.cb_prev: torch.Tensor | None = None
        self.replaced: list[tuple[int, float]] = []
        self.train_moves: list[float] = []
        self.eval_moves: list[float] = []
        self.eval_passes = 0
        self.tokens = 0
        self._last_step: list[int | None] = [None] * stages
        self.init_code_norm_max: float | None = None

    def initial(self, codebook: torch.Tensor | None) -> None:
        """The codebook as initialised, before the first training forward (row norms kept)."""
        if codebook is not None:
            cb = codebook.detach().float().cpu()
            if torch.isfinite(cb).all():
                self.init_code_norm_max = float(cb.norm(dim=-1).max())

    # ------------------------------------------------------------------ per step
    def codes(self, step: int, idx: torch.Tensor) -> None:
        """Indices of one training forward ([..., stages]); several per step add up."""
        idx = idx.detach().reshape(-1, self.stages).cpu()
        self.tokens = idx.shape[0]
        for s in range(self.stages):
            c = torch.bincount(idx[:, s].clamp(0, self.K - 1), minlength=self.K)
            if len(self.win[s]) and self._last_step[s] == step:
                self.win[s][-1] = self.win[s][-1] + c
            else:
                self.win[s].append(c)
            self.ever[s] += c
            if 5 <= step < 25:
                self.first[s] += c
            self._last_step[s] = step

    def end_step(self, step: int, loss: float, task: float, z: torch.Tensor | None,
                 codebook: torch.Tensor | None, z_raw: torch.Tensor | None = None) -> None:
        """After the optimizer step: loss, batch perplexity, codebook movement, cadence stats."""
        self.loss.append(_f(loss))
        self.task.append(_f(task))
        if not math.isfinite(loss):
            self.nonfinite["loss_steps"] += 1
            if self.nonfinite["first_step"] is None:
                self.nonfinite["first_step"] = step
        if self.win[0]:
            self.ppl.append(perplexity(self.win[0][-1]))
        zf = None
        if z is not None:
            zf = z.detach().reshape(-1, z.shape[-1]).float()
            bad = int((~torch.isfinite(zf)).sum())
            self.nonfinite["z"] += bad
            if bad and self.nonfinite["first_step"] is None:
                self.nonfinite["first_step"] = step
        if codebook is not None:
            cb = codebook.detach().float().cpu()
            bad = int((~torch.isfinite(cb)).sum())
            if bad:
                self.nonfinite["codebook"] = max(self.nonfinite["codebook"], bad)
                if self.nonfinite["first_step"] is None:
                    self.nonfinite["first_step"] = step
            if self.cb_init is None:
                self.cb_init = cb.clone()  # after step 0: past any k-means / data init
            if self.cb_prev is not None and torch.isfinite(cb).all() and torch.isfinite(self.cb_prev).all():
                delta = (cb - self.cb_prev).norm(dim=-1)
                self.train_moves.append(float(delta.mean()))
                if step >= self.steps // 2 and zf is not None and torch.isfinite(zf).all():
                    # a replaced row jumps by about an input's norm; EMA / gradient moves are smaller
                    zmed = float(zf.norm(dim=-1).median())
                    self.replaced.append((step, float((delta > 0.5 * max(zmed, 1e-12)).float().mean())))
            self.cb_prev = cb.clone()
        if step % self.every == 0 or step == self.steps - 1:
            row = self._cadence(step, zf, codebook)
            if z_raw is not None:  # the input before any projection / normalisation of the lookup
                zr = z_raw.detach().reshape(-1, z_raw.shape[-1]).float()
                if torch.isfinite(zr).all():
                    row["z_raw_norm_median"] = float(zr.norm(dim=-1).median())
            self.cadence.append(row)

    def task_grad(self, step: int, g: torch.Tensor | None) -> None:
        """The task loss's gradient at the quantizer input (None: no path from the task loss)."""
        v = 0.0 if g is None else float(torch.linalg.vector_norm(g.detach().float()))
        self.grad.append((step, _f(v) if math.isfinite(v) else None))

    def eval_pass(self, before: torch.Tensor | None, after: torch.Tensor | None) -> None:
        """Codebook before / after an evaluation pass (any change: statistics updated by eval)."""
        self.eval_passes += 1
        if before is not None and after is not None:
            d = (after.detach().float().cpu() - before.detach().float().cpu()).norm(dim=-1)
            self.eval_moves.append(float(d.mean()) if torch.isfinite(d).all() else float("inf"))

    def _cadence(self, step: int, z: torch.Tensor | None, codebook: torch.Tensor | None) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        if z is not None and torch.isfinite(z).all():
            zn = z.norm(dim=-1)
            row["z_norm_median"] = float(zn.median())
        if codebook is not None:
            cb = codebook.detach().float().cpu()
            if torch.isfinite(cb).all():
                en = cb.norm(dim=-1)
                row["code_norm_median"] = float(en.median())
                row["code_norm_max"] = float(en.max())
                used = self.win_counts(0) > 0
                if used.any():
                    row["used_code_norm_median"] = float(en[used].median())
        if "z_norm_median" in row and row.get("code_norm_median"):
            row["scale_ratio"] = row["z_norm_median"] / max(row["code_norm_median"], 1e-30)
            row["blowup"] = row["code_norm_max"] / max(row["z_norm_median"], 1e-30)
            if row.get("used_code_norm_median"):
                row["scale_ratio_used"] = row["z_norm_median"] / max(row["used_code_norm_median"], 1e-30)
        return row

    def win_counts(self, s: int) -> torch.Tensor:
        return torch.stack(list(self.win[s])).sum(0) if self.win[s] else torch.zeros(self.K, dtype=torch.long)

    # ------------------------------------------------------------------ result
    def result(self, final_codebook: torch.Tensor | None, extra: dict[str, Any]) -> dict[str, Any]:
        stages = []
        for s in range(self.stages):
            w = self.win_counts(s)
            n = int(w.sum())
            stages.append({
                "window_tokens": n,
                "perplexity": perplexity(w),
                "used_fraction": float((w > 0).float().mean()),
                "unused_fraction": float((w == 0).float().mean()),
                "ever_used_fraction": float((self.ever[s] > 0).float().mean()),
                "first_perplexity": perplexity(self.first[s]),
                "top_share": float(w.max()) / max(n, 1),
            })
        out: dict[str, Any] = {
            "K": self.K, "stages": self.stages, "steps": self.steps, "tokens_per_forward": self.tokens,
            "usage": stages,
            "loss": self.loss, "task_loss": self.task, "batch_perplexity": [round(p, 3) for p in self.ppl],
            "task_grad": self.grad,
            "cadence": self.cadence,
            "nonfinite": dict(self.nonfinite),
            "eval_passes": self.eval_passes,
            "eval_move_max": max(self.eval_moves) if self.eval_moves else None,
            "train_move_median": sorted(self.train_moves)[len(self.train_moves) // 2] if self.train_moves else None,
            "replaced_late_mean": (sum(v for _, v in self.replaced) / len(self.replaced)) if self.replaced else None,
            "init_code_norm_max": self.init_code_norm_max,
        }
        if final_codebook is not None and self.cb_init is not None:
            cb = final_codebook.detach().float().cpu()
            finite = bool(torch.isfinite(cb).all() and torch.isfinite(self.cb_init).all())
            if finite:
                diff = (cb - self.cb_init).abs().max()
                scale = self.cb_init.abs().max().clamp_min(1e-30)
                out["codebook_moved_max_abs"] = float(diff)
                out["codebook_moved_rel"] = float(diff / scale)
                zmed = [c["z_norm_median"] for c in self.cadence if c.get("z_norm_median")]
                out["duplicate_fraction"] = duplicate_fraction(cb, zmed[-1] if zmed else None)
                out["zero_row_fraction"] = float((cb.norm(dim=-1) <= 1e-3 * (zmed[-1] if zmed else 1.0)).float().mean())
            else:
                out["codebook_moved_max_abs"] = None
        out.update(extra)
        return out


def duplicate_fraction(cb: torch.Tensor, z_norm: float | None = None) -> float:
    """Share of the K rows within 1e-6 (relative) of another row, rows near the origin left out
    (dead rows of Sonnet-style EMAs decay towards 0: dead, not duplicates)."""
    K = cb.shape[0]
    norms = cb.norm(dim=-1)
    scale = z_norm if z_norm else float(norms.median()) or 1.0
    live = cb[norms > 1e-3 * scale]
    if len(live) < 2:
        return 0.0
    d = torch.cdist(live, live, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    return float((d.min(1).values <= 1e-6 * scale).sum()) / K
