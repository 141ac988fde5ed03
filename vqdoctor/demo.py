"""The embedded default behind `vqdoctor demo`: a tiny VQ-EMA classifier that collapses, and its fix.

`run_demo` trains two copies of one small model on synthetic data on the CPU, saves their
checkpoints and probes, and diagnoses both with `vqdoctor.diagnosis.inspect_checkpoints`.

## The model (the user story of docs/contract.md#the-user-story at its own sizes, fewer steps)
10-class Gaussian-mixture data (3 modes per class, 32-d inputs) -> encoder MLP to 128-d ending in
a LayerNorm (the usual guard against encoder-norm growth, lucidrains #26) -> VQ-EMA layer
(K = 512 codes of dimension 128, decay 0.99, Laplace eps 1e-5, codebook initialised from
encoder outputs like a k-means++ init, commitment 0.01) -> MLP head. Cross-entropy +
commitment, Adam (lr 1e-3), gradient clipping 1.0, batch 512 (one token per example, so
n/K = 1), 200 steps. Evaluation runs in eval mode in both runs.

## The mechanism: zero-initialised EMA counts without debiasing (`ema-divergence`)
In the collapsing run `cluster_size` starts at zeros (as in rosinality, taming's `EmbeddingEMA`,
zalando, encodec without k-means, lucidrains < 1.15.3) and the EMA is not debiased. The first
update `embed = embed_avg / smoothed(cluster_size)` then divides by almost nothing
(docs/ema-and-layouts.md#zero-initialised-counts-blow-rows-up):

* a code hit by c tokens of the first batch becomes ~`decay / ((1 - decay) c)` = 99/c times its
  initial vector (c = 1-3 with one token per example; ~290 of the 512 codes);
* a code the first batch missed becomes ~`decay / eps` = 1e5 times its initial vector (~220).

The code with the largest first-batch count is the least inflated. It takes every input of the
second batch, and the EMA pulls it back to the data within a step (perplexity 1-2 from then on).
The LayerNorm keeps `||z|| ~ sqrt(128) ~ 11`, so the encoder never reaches the other rows
(norms from ~1e2 up to ~1e5): the collapse is permanent, the head sees one or two vectors and
accuracy stays at chance. The codes hit once keep tiny non-zero counts (`0.01 c x 0.99^t`),
which is the story's "~280-300 codes with tiny non-zero counts". The codes never hit keep counts
of exactly 0. Both keep their blow-up, because their `m` and `N` decay together.

Measured on seeds 0-4 with the defaults (torch 2.13, CPU; the test re-checks seed 0):

| | collapsing run | fixed run |
|---|---|---|
| batch perplexity, 2nd step / last | 1.0-2.0 / 1.0-2.0 | 226-243 / 195-202 |
| codes used by the held-out set | 1-2 of 512 | 430-447 |
| test accuracy (chance 0.10) | 0.09-0.20 | 0.965-0.977 |
| counts < 1% of n/K (tiny non-zero / exactly 0) | 510-511 (278-293 / 218-232) | 0 |
| loss, last / max | 1.79-2.32 / 5.4-8.7 | 0.05-0.16 / 2.32-2.37 |

`run_demo` takes 6-11 s on the shared 2-core machine, both runs and both diagnoses (about
2.5 s per run when the machine is otherwise idle).

What does *not* reproduce the story here (measured while choosing this setup):

* The same bug without the LayerNorm collapses just as fast but heals. The straight-through
  gradient on a constant output pushes `||z||` up until inputs reach the x99/c rows, which the
  EMA then pulls back. At 200 steps accuracy is 0.28-0.45 (perplexity 2.6-4.6); at 400 steps
  it is 0.62-0.77.
* The story's loss of 1e13. With commitment 0.01 and a mean-squared commitment term, the loss
  only gets large when inputs are assigned to blown-up rows, and they never are: that is why
  those rows die. Here the loss spikes once (to 5-9, when the head first sees the inflated row
  it is given at step 2) and then stays near ln(10) = 2.3, because the model cannot learn. A
  large loss needs `||z||` to grow without bound (no LayerNorm, weak commitment), and that
  heals this collapse (see above). It could also come from unnormalised inputs on a ~1e3 scale.
* An evaluation pass with the VQ left in training mode before training (one example; a
  larger LayerNorm-free variant) also gives perplexity 1 from the first batch, because every
  code but one becomes x1e5. But all those counts are exactly 0, and the loss peaks at ~40.

## The fix (vqdoctor's advice for ema-divergence, then for dead-codes)
Counts start at ones, so the EMA is consistent from step one (lucidrains >= 1.15.3). A
classifier's encoder moves while it learns, and strands codes. So codes whose count falls below
half of n/K are also re-seeded from the current batch, with their statistics reset. Measured
on seeds 0-2: counts at ones without the re-seeding keep 38-43 of 512 codes in use (vqdoctor:
dead-codes). Re-seeding alone, with zero counts, also hides this bug: it re-seeds every
inflated row after the first step.

## What vqdoctor should say about the collapsing run
First `ema-divergence` (VQ004, error): blown-up rows, the zero-init signature. Then, each
`caused_by` a cause above it: `scale-mismatch` (probe `||z||` against the codebook),
`dead-codes` (>99% of counts below 1% of n/K) and `index-collapse` (perplexity ~1). The fixed
run should be reported healthy.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqdoctor.results.model import Report


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and hyper-parameters shared by both runs.

    Attributes:
        input_dim: dimension of the synthetic inputs.
        classes: number of classes.
        modes_per_class: Gaussian modes per class.
        train_size: training examples.
        test_size: held-out examples (also the probe).
        hidden: width of the encoder and head MLPs.
        dim: code dimension D (encoder output).
        codebook_size: number of codes K.
        batch_size: examples (= tokens) per step.
        steps: optimizer steps per run.
        lr: Adam learning rate.
        commitment: commitment-loss weight.
        decay: EMA decay.
        eps: Laplace-smoothing epsilon.
        clip: gradient-norm clipping.
        replace_below: fixed run only: re-seed a code whose EMA count falls below this
            fraction of the expected count n/K.
        snapshot_step: step after which an early checkpoint of the collapsing run is saved
            (drift evidence); None for none.
        watch_flush_every: flush cadence of the live watch (steps): the panel updates, and
            alerts can fire, at each flush.
        watch_stats_every: cadence statistics of the live watch (steps).
    """

    input_dim: int = 32
    classes: int = 10
    modes_per_class: int = 3
    train_size: int = 10_000
    test_size: int = 4_096
    hidden: int = 128
    dim: int = 128
    codebook_size: int = 512
    batch_size: int = 512
    steps: int = 200
    lr: float = 1e-3
    commitment: float = 0.01
    decay: float = 0.99
    eps: float = 1e-5
    clip: float = 1.0
    replace_below: float = 0.5
    snapshot_step: int | None = 20
    watch_flush_every: int = 10
    watch_stats_every: int = 5


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` returns.

    Attributes:
        collapsed: vqdoctor's report on the collapsing run.
        healthy: vqdoctor's report on the fixed run.
        collapsed_stats: training statistics of the collapsing run: `perplexity` (last batch),
            `perplexity_step2` (the first batch after one EMA update), `codes_used` (by the
            held-out set), `dead_codes` (EMA counts below 1% of n/K), `test_accuracy`,
            `final_loss`, `max_loss`, `steps`, `seconds`.
        healthy_stats: the same for the fixed run.
        checkpoints: saved files by role: "collapsed", "healthy" (state dicts),
            "collapsed_probe", "healthy_probe" ([N, D] encoder outputs on held-out data) and,
            when saved, "collapsed_early" (an early checkpoint of the collapsing run).
        collapsed_run: vqdoctor's report on the collapsing run's recorded training (the live
            watch: per-step signals, findings with the step they first held).
        healthy_run: the same for the fixed run.
        run_dirs: the run directories, by run ("collapsed", "healthy").
    """

    collapsed: Report
    healthy: Report
    collapsed_stats: dict[str, Any]
    healthy_stats: dict[str, Any]
    checkpoints: dict[str, Path] = field(default_factory=dict)
    collapsed_run: Report | None = None
    healthy_run: Report | None = None
    run_dirs: dict[str, Path] = field(default_factory=dict)


class EMAQuantizer(nn.Module):
    """Euclidean VQ with an EMA codebook (van den Oord et al. 2017; Sonnet-style smoothing).

    Buffers (the layout vqdoctor's generic adapter reads): `embed` [K, D], `cluster_size` [K],
    `embed_avg` [K, D], `initted` (bool).

    Args:
        codebook_size: K.
        dim: D.
        decay: EMA decay.
        eps: Laplace-smoothing epsilon.
        zero_init_counts: the bug: counts start at 0 and the EMA is not debiased. False starts
            them at ones, consistent with `embed_avg = embed`.
        replace_below: re-seed codes whose count falls below this fraction of n/K from the
            current batch (None: no replacement).
    """

    def __init__(self, codebook_size: int, dim: int, *, decay: float = 0.99, eps: float = 1e-5,
                 zero_init_counts: bool = False, replace_below: float | None = None) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.eps = decay, eps
        self.zero_init_counts, self.replace_below = zero_init_counts, replace_below
        self.register_buffer("embed", torch.zeros(codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim))
        self.register_buffer("initted", torch.tensor(False))
        self.generator: torch.Generator | None = None

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Initialise the codebook from K distinct encoder outputs (data-dependent init)."""
        rows = z[torch.randperm(z.shape[0], generator=generator)[: self.codebook_size]]
        self.embed.copy_(rows)
        self.embed_avg.copy_(rows)
        self.cluster_size.fill_(0.0 if self.zero_init_counts else 1.0)
        self.initted.fill_(True)
        self.generator = generator

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize `z` [N, D].

        Returns:
            (straight-through output [N, D], commitment MSE (unweighted), code indices [N]).
        """
        dist = (z.detach().pow(2).sum(1, keepdim=True) - 2 * z.detach() @ self.embed.t()
                + self.embed.pow(2).sum(1))
        idx = dist.argmin(1)
        q = self.embed[idx]  # looked up before the EMA step, as every library does
        if self.training:
            self._ema_update(z.detach(), idx)
        commit = F.mse_loss(z, q)
        return z + (q - z).detach(), commit, idx

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.codebook_size).to(z.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        if self.replace_below is not None:
            expected = z.shape[0] / self.codebook_size
            dead = self.cluster_size < self.replace_below * expected
            k = int(dead.sum())
            if k:
                pick = torch.randint(0, z.shape[0], (k,), generator=self.generator)
                # Reset the statistics with the row, or the next EMA step undoes the re-seed.
                self.embed[dead] = z[pick]
                self.cluster_size[dead] = expected
                self.embed_avg[dead] = z[pick] * expected


class TinyVQClassifier(nn.Module):
    """encoder (MLP + LayerNorm) -> `quantizer` (EMAQuantizer) -> head (MLP) -> logits."""

    def __init__(self, cfg: DemoConfig, *, zero_init_counts: bool,
                 replace_below: float | None) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(cfg.input_dim, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, cfg.dim), nn.LayerNorm(cfg.dim))
        self.quantizer = EMAQuantizer(cfg.codebook_size, cfg.dim, decay=cfg.decay, eps=cfg.eps,
                                      zero_init_counts=zero_init_counts,
                                      replace_below=replace_below)
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, cfg.classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (logits, commitment MSE, code indices)."""
        q, commit, idx = self.quantizer(self.encoder(x))
        return self.head(q), commit, idx


def make_data(cfg: DemoConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian-mixture classification data: (x_train, y_train, x_test, y_test)."""
    n = cfg.train_size + cfg.test_size
    means = torch.randn(cfg.classes, cfg.modes_per_class, cfg.input_dim, generator=generator)
    y = torch.randint(0, cfg.classes, (n,), generator=generator)
    mode = torch.randint(0, cfg.modes_per_class, (n,), generator=generator)
    x = means[y, mode] + torch.randn(n, cfg.input_dim, generator=generator)
    t = cfg.train_size
    return x[:t], y[:t], x[t:], y[t:]


def perplexity(idx: torch.Tensor, k: int) -> float:
    """exp(entropy) of the code assignments `idx`."""
    p = torch.bincount(idx, minlength=k).double()
    p = p[p > 0] / p.sum()
    return math.exp(float(-(p * p.log()).sum()))


def train_run(cfg: DemoConfig, *, zero_init_counts: bool, replace_below: float | None, seed: int,
              workdir: Path, name: str, snapshot_step: int | None = None,
              run_dir: Path | None = None, on_flush: Callable[[], None] | None = None
              ) -> tuple[dict[str, Any], dict[str, Path]]:
    """Train one run (watched by `vqdoctor.watch` when `run_dir` is given), save its checkpoint(s)
    and probe.

    Args:
        cfg: sizes and hyper-parameters.
        zero_init_counts: the bug (see `EMAQuantizer`).
        replace_below: dead-code re-seeding threshold as a fraction of n/K, None for none.
        seed: seeds data, initialisation and batches; both runs with one seed see the same data.
        workdir: where files are written.
        name: file stem, e.g. "collapsed".
        snapshot_step: also save the model after this step, as `{name}_step{N}.pt` (role
            `{name}_early`).
        run_dir: record the training here with `vqdoctor.watch` (None: not watched).
        on_flush: called after each flush of the watch (the live panel's refresh).

    Returns:
        (statistics, files by role).
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = make_data(cfg, g)
    torch.manual_seed(seed)  # module initialisation (global RNG, restored by the caller)
    model = TinyVQClassifier(cfg, zero_init_counts=zero_init_counts, replace_below=replace_below)
    with torch.no_grad():
        model.quantizer.init_from(model.encoder(x_tr[: 8 * cfg.codebook_size]), g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    files: dict[str, Path] = {}
    losses: list[float] = []
    batch_ppl = ppl_step2 = float("nan")
    model.train()
    with ExitStack() as stack:
        doctor = None
        if run_dir is not None:
            from vqdoctor.live.doctor import watch

            doctor = stack.enter_context(watch(model, run_dir, flush_every=cfg.watch_flush_every,
                                               stats_every=cfg.watch_stats_every))
            if on_flush is not None:
                doctor.on_flush(lambda _records: on_flush())
        for step in range(1, cfg.steps + 1):
            i = torch.randint(0, cfg.train_size, (cfg.batch_size,), generator=g)
            logits, commit, idx = model(x_tr[i])
            loss = F.cross_entropy(logits, y_tr[i]) + cfg.commitment * commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            if doctor is not None:
                doctor.step(loss=loss)
            losses.append(loss.item())
            batch_ppl = perplexity(idx, cfg.codebook_size)
            if step == 2:  # the first batch that meets the codebook after one EMA update
                ppl_step2 = batch_ppl
            if step == snapshot_step:
                files[f"{name}_early"] = workdir / f"{name}_step{step}.pt"
                torch.save(model.state_dict(), files[f"{name}_early"])
    model.eval()
    with torch.no_grad():
        z = model.encoder(x_te)
        logits, _, idx = model(x_te)
        acc = float((logits.argmax(1) == y_te).double().mean())
    counts = model.quantizer.cluster_size
    expected = float(counts.sum()) / cfg.codebook_size
    files[name] = workdir / f"{name}.pt"
    files[f"{name}_probe"] = workdir / f"{name}_probe.pt"
    torch.save(model.state_dict(), files[name])
    torch.save(z.contiguous(), files[f"{name}_probe"])
    stats: dict[str, Any] = {
        "perplexity": batch_ppl,
        "perplexity_step2": ppl_step2,
        "codes_used": int(torch.unique(idx).numel()),
        "dead_codes": int((counts < 0.01 * expected).sum()),
        "test_accuracy": acc,
        "final_loss": losses[-1],
        "max_loss": max(losses),
        "steps": cfg.steps,
        "seconds": time.perf_counter() - t0,
    }
    return stats, files


PanelFactory = Callable[[str, Path], AbstractContextManager[Callable[[], None]]]
"""Given (run name, run directory), a context manager around one watched training that yields
the refresh function to call after each flush (the CLI's live panel)."""


def _fresh_run_dir(path: Path) -> Path:
    """The demo's own run directory, emptied of an earlier demo's run (`--keep DIR` twice)."""
    if (path / "meta.json").exists() or any(path.glob("rank*.jsonl")):
        shutil.rmtree(path)
    return path


def run_demo(workdir: Path, *, seed: int = 0, progress: Callable[[str], None] | None = None,
             config: DemoConfig | None = None, panel: PanelFactory | None = None,
             watch: bool = True) -> DemoResult:
    """Train the collapsing and the fixed run under `vqdoctor.watch`, save their files in
    `workdir`, diagnose both: from the recorded runs and from the checkpoints.

    The global torch RNG state and thread count are restored afterwards. Watching changes
    nothing in the trainings (same parameters, bit for bit).

    Args:
        workdir: folder for checkpoints, probes and run directories (`runs/collapsed`,
            `runs/healthy`; created if missing).
        seed: random seed of both runs (same data, same initialisation).
        progress: called with one short line per stage.
        config: sizes and hyper-parameters (defaults: `DemoConfig()`).
        panel: the live panel around each watched training (see `PanelFactory`).
        watch: record the trainings with `vqdoctor.watch` (False: checkpoints only).

    Returns:
        The run and checkpoint reports, training statistics, files and run directories.
    """
    from vqdoctor.diagnosis import inspect_checkpoints

    cfg = config or DemoConfig()
    say = progress or (lambda _msg: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_dirs = ({name: _fresh_run_dir(workdir / "runs" / name) for name in ("collapsed", "healthy")}
                if watch else {})

    def train(name: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Path]]:
        run_dir = run_dirs.get(name)
        with ExitStack() as stack:
            refresh = (stack.enter_context(panel(name, run_dir))
                       if panel is not None and run_dir is not None else None)
            return train_run(cfg, seed=seed, workdir=workdir, name=name, run_dir=run_dir,
                             on_flush=refresh, **kw)

    threads = torch.get_num_threads()
    # Tiny matrices: one thread avoids the synchronisation cost of more, and leaves the other
    # cores to whatever else runs.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            say(f"training the collapsing run (seed {seed}, {cfg.steps} steps, "
                f"EMA counts zero-initialised)...")
            c_stats, c_files = train("collapsed", zero_init_counts=True, replace_below=None,
                                     snapshot_step=cfg.snapshot_step)
            say(f"training the fixed run (seed {seed}, {cfg.steps} steps, "
                f"counts start at ones, dead codes re-seeded)...")
            h_stats, h_files = train("healthy", zero_init_counts=False,
                                     replace_below=cfg.replace_below)
        collapsed_run = healthy_run = None
        if watch:
            from vqdoctor.diagnosis import report_run

            say("diagnosing the recorded runs...")
            collapsed_run = report_run(run_dirs["collapsed"])
            healthy_run = report_run(run_dirs["healthy"])
        say("diagnosing the collapsing run's checkpoints...")
        c_paths = [c_files[k] for k in ("collapsed_early", "collapsed") if k in c_files]
        collapsed = inspect_checkpoints(c_paths, probe=c_files["collapsed_probe"])
        say("diagnosing the fixed run's checkpoint...")
        healthy = inspect_checkpoints([h_files["healthy"]], probe=h_files["healthy_probe"])
    finally:
        torch.set_num_threads(threads)
    order = ("collapsed", "healthy", "collapsed_probe", "healthy_probe", "collapsed_early")
    files = {**c_files, **h_files}
    return DemoResult(collapsed=collapsed, healthy=healthy, collapsed_stats=c_stats,
                      healthy_stats=h_stats, checkpoints={k: files[k] for k in order if k in files},
                      collapsed_run=collapsed_run, healthy_run=healthy_run, run_dirs=run_dirs)


__all__ = ["DemoConfig", "DemoResult", "EMAQuantizer", "PanelFactory", "TinyVQClassifier",
           "make_data", "perplexity", "run_demo", "train_run"]
