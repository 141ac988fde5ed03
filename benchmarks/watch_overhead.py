"""What `vqdoctor.watch` adds to a training step, next to the monitoring anchors of
benchmarks/README.md#gpu-anchors, measured in one run (interleaved rounds, medians).

Configurations, each with its own copy of the same model and optimizer:

- `unmonitored`: the plain step.
- `vqdoctor`: `vqdoctor.watch(model)` with every signal on at the default cadence
  (flush_every=50, stats_every=10) and `doctor.step(loss=loss)`.
- `item_perplexity`: per-step perplexity and loss read with `.item()`.
- `grad_norm_print`: every parameter's `grad.norm()` printed every step (to /dev/null).
- `detect_anomaly`: the step under `torch.autograd.detect_anomaly()`.
- `naive_accumulate`: per step `bincount` of the codes + `torch._foreach_norm` of all gradients
  into device buffers, one host copy every 50 steps.

Model: a conv VQ-VAE (encoder 3 -> w -> w -> c with two stride-2 convs, quantizer, mirrored
decoder), Adam, MSE + commitment. Quantizer: vector-quantize-pytorch `VectorQuantize` (EMA) or a
sync-free Sonnet-style EMA quantizer (`--quantizer syncfree`).

A round is `--steps` steps (default 50 = one flush interval, so every vqdoctor round holds exactly
one flush and five cadence steps) of every configuration. On the CPU the configurations alternate
every step and each step is timed on its own (`--interleave step`: load from other processes
shifts over seconds, so neighbouring steps see the same machine); both wall time and process CPU
time are reported. On CUDA each configuration runs its block of steps in turn with a
synchronisation at the end of each block only (`--interleave block`). Reported: the median time
per step over rounds, and the ratio to `unmonitored` as the median over rounds of the per-round
ratio (paired, so slow phases of the machine cancel).

Usage::

    python benchmarks/watch_overhead.py                       # CPU reference model
    python benchmarks/watch_overhead.py --device cuda --tokens 8192
    python benchmarks/watch_overhead.py --device cuda --tokens 65536 --quantizer syncfree
    python benchmarks/watch_overhead.py --device cuda --sync-check   # no sync between flushes

`--sync-check --device cuda` runs vqdoctor-monitored steps (sync-free quantizer) under
`torch.cuda.set_sync_debug_mode("error")` between two flushes, including cadence steps, an
evaluation forward and the straight-through gradient hooks; it fails when anything synchronises.
On the CPU (`--sync-check` alone) it runs the same flow without the check, to test the plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vqdoctor  # noqa: E402
from tests.watch.watch_models import SyncFreeEMAQuantizer  # noqa: E402  (the no-sync test's quantizer)

# (image size, batch, K) per tokens-per-step config, as in the GPU anchors; "cpu" is the CPU reference
CONFIGS = {
    8192: {"size": 64, "batch": 32, "K": 1024, "width": 128, "code": 64},
    65536: {"size": 128, "batch": 64, "K": 8192, "width": 128, "code": 64},
    "cpu": {"size": 32, "batch": 8, "K": 256, "width": 32, "code": 32},
}


class ConvVQVAE(nn.Module):
    """Encoder 3 -> w -> w -> c (two stride-2 convs), quantizer on [B, H*W, c], mirrored decoder."""

    def __init__(self, quantizer: nn.Module, width: int, code: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 4, 2, 1),
                                     nn.ReLU(), nn.Conv2d(width, code, 3, 1, 1))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(nn.Conv2d(code, width, 3, 1, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, 3, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        b, c, h, w = z.shape
        q, idx, aux = self._quantize(z.flatten(2).transpose(1, 2))
        return self.decoder(q.transpose(1, 2).reshape(b, c, h, w)), aux, idx

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.quantizer(z)
        if isinstance(self.quantizer, SyncFreeEMAQuantizer):
            return out[0], out[2], out[1]
        return out[0], out[1], out[2].sum()


def build(args: argparse.Namespace, cfg: dict[str, Any]) -> nn.Module:
    if args.quantizer == "syncfree":
        q: nn.Module = SyncFreeEMAQuantizer(cfg["code"], cfg["K"])
    else:
        from vector_quantize_pytorch import VectorQuantize

        q = VectorQuantize(dim=cfg["code"], codebook_size=cfg["K"], decay=0.99, commitment_weight=0.25)
    return ConvVQVAE(q, cfg["width"], cfg["code"])


def perplexity_of(idx: torch.Tensor, K: int) -> torch.Tensor:
    p = torch.bincount(idx.reshape(-1), minlength=K).float()
    p = p / p.sum()
    return torch.exp(-(p * torch.log(p + 1e-10)).sum())


class Runner:
    """One configuration: its own model copy, optimizer and per-step extra work."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, K: int, run_dir: str):
        self.name, self.model, self.x, self.K = name, model, x, K
        self.opt = torch.optim.Adam(model.parameters(), lr=2e-4)
        self.doctor = None
        self.devnull = io.StringIO()
        self.buf: torch.Tensor | None = None
        self.gbuf: torch.Tensor | None = None
        self.i = 0
        if name == "vqdoctor":
            self.doctor = vqdoctor.watch(model, run_dir).start()

    def step(self) -> None:
        m, x = self.model, self.x
        ctx = torch.autograd.detect_anomaly() if self.name == "detect_anomaly" else contextlib.nullcontext()
        with ctx:
            y, aux, idx = m(x)
            loss = F.mse_loss(y, x) + aux
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        if self.name == "vqdoctor":
            self.doctor.step(loss=loss)
        elif self.name == "item_perplexity":
            print(perplexity_of(idx, self.K).item(), loss.item(), file=self.devnull)
        elif self.name == "grad_norm_print":
            for n, p in m.named_parameters():
                if p.grad is not None:
                    print(n, p.grad.norm().item(), file=self.devnull)
        elif self.name == "naive_accumulate":
            grads = [p.grad for p in m.parameters() if p.grad is not None]
            if self.buf is None:
                self.buf = torch.zeros(50, self.K, device=x.device, dtype=torch.long)
                self.gbuf = torch.zeros(50, len(grads), device=x.device)
            slot = self.i % 50
            self.buf[slot] += torch.bincount(idx.reshape(-1), minlength=self.K)
            self.gbuf[slot] = torch.stack(torch._foreach_norm(grads))
            if slot == 49:
                host = (self.buf.cpu(), self.gbuf.cpu())  # the flush
                del host
                self.buf.zero_()
        self.i += 1
        if self.devnull.tell() > 1 << 20:
            self.devnull = io.StringIO()

    def close(self) -> None:
        if self.doctor is not None:
            self.doctor.close()


NAMES = ["unmonitored", "vqdoctor", "item_perplexity", "grad_norm_print", "detect_anomaly", "naive_accumulate"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    cfg = dict(CONFIGS["cpu" if args.tokens is None else args.tokens])
    if args.tokens is None and args.batch:
        cfg["batch"] = args.batch
    torch.manual_seed(0)
    base = build(args, cfg).to(dev)
    x = torch.rand(cfg["batch"], 3, cfg["size"], cfg["size"], device=dev)
    names = [n for n in NAMES if not args.only or n in args.only]
    tmp = tempfile.mkdtemp(prefix="vqd-bench-")
    runners = [Runner(n, copy.deepcopy(base), x, cfg["K"], os.path.join(tmp, n)) for n in names]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for r in runners:  # warm-up: k-means init, allocator, first flush
        for _ in range(args.warmup):
            r.step()
    sync()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        if args.interleave == "step":
            # every configuration takes one step in turn, each step timed on its own: load from other
            # processes shifts on a scale of seconds, so neighbouring steps see the same machine
            tw = dict.fromkeys(names, 0.0)
            tc = dict.fromkeys(names, 0.0)
            for _ in range(args.steps):
                for r in runners:
                    t0, c0 = time.perf_counter(), time.process_time()
                    r.step()
                    tw[r.name] += time.perf_counter() - t0
                    tc[r.name] += time.process_time() - c0
            for n in names:
                wall[n].append(tw[n] / args.steps * 1e3)
                cpu[n].append(tc[n] / args.steps * 1e3)
            continue
        for r in runners:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                r.step()
            sync()
            wall[r.name].append((time.perf_counter() - t0) / args.steps * 1e3)
            cpu[r.name].append((time.process_time() - c0) / args.steps * 1e3)
    for r in runners:
        r.close()
    med_w = {n: statistics.median(v) for n, v in wall.items()}
    med_c = {n: statistics.median(v) for n, v in cpu.items()}

    def paired(times: dict[str, list[float]], n: str) -> float:
        """Median over rounds of (time of n / unmonitored time) in the same round."""
        return statistics.median(a / b for a, b in zip(times[n], times["unmonitored"], strict=True))

    return {
        "device": describe_device(dev), "torch": torch.__version__, "quantizer": args.quantizer,
        "tokens_per_step": cfg["batch"] * (cfg["size"] // 4) ** 2, "K": cfg["K"], "config": cfg,
        "rounds": args.rounds, "steps_per_round": args.steps, "interleave": args.interleave,
        "date": time.strftime("%Y-%m-%d"),
        "results": {n: {"wall_ms": med_w[n], "wall_ratio": paired(wall, n), "cpu_ms": med_c[n],
                        "cpu_ratio": paired(cpu, n), "wall_rounds": wall[n], "cpu_rounds": cpu[n]}
                    for n in names},
    }


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), " \
           f"{os.cpu_count()} cores visible"


def sync_check(args: argparse.Namespace) -> int:
    """Monitored steps under set_sync_debug_mode("error") between flushes; 0 when none synchronised."""
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("sync-check needs CUDA", file=sys.stderr)
        return 2
    dry = dev.type != "cuda"  # on the CPU: the same flow without the sync check (plumbing only)
    cfg = CONFIGS[args.tokens or (8192 if not dry else "cpu")]
    args.quantizer = "syncfree"  # vector-quantize-pytorch synchronises twice per step by itself
    torch.manual_seed(0)
    model = build(args, cfg).to(dev)
    x = torch.rand(cfg["batch"], 3, cfg["size"], cfg["size"], device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    steps = 45
    with tempfile.TemporaryDirectory() as tmp:
        doctor = vqdoctor.watch(model, tmp, flush_every=steps + 5, stats_every=10).start()
        for _ in range(3):  # warm-up outside the check (allocator, cuBLAS handles)
            y, aux, _ = model(x)
            loss = F.mse_loss(y, x) + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
        if not dry:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        error = None
        try:
            for i in range(steps - 3):
                y, aux, _ = model(x)
                loss = F.mse_loss(y, x) + aux
                opt.zero_grad()
                loss.backward()
                opt.step()
                doctor.step(loss=loss)
                if i == 20:
                    with torch.no_grad():  # an evaluation forward in train mode (eval-mutation probe)
                        model(x)
        except RuntimeError as e:
            error = e
        finally:
            if not dry:
                torch.cuda.set_sync_debug_mode("default")
        disabled = sorted(doctor._recorder._disabled)
        events = [e["message"] for e in doctor._recorder.events]
        doctor.close()
        df = vqdoctor.load_run(tmp)
    cadence = int(df["z_norm_median"].notna().sum()) if "z_norm_median" in df else 0
    st = int(df["st_grad_ratio"].notna().sum()) if "st_grad_ratio" in df else 0
    ok = error is None and not disabled and cadence >= 4 and st >= 4
    verdict = ("pass" if ok else "fail") if not dry else ("dry-run ok" if ok else "dry-run failed")
    print(json.dumps({"sync_check": verdict, "device": describe_device(dev),
                      "training_error": None if error is None else str(error), "disabled_probes": disabled,
                      "events": events, "cadence_rows": cadence, "st_rows": st}, indent=1))
    return 0 if ok else 1


def markdown(res: dict[str, Any], cpu_times: bool) -> str:
    lines = ["| monitor | ms/step (wall) | ratio (wall) |" + (" ms/step (CPU) | ratio (CPU) |" if cpu_times else ""),
             "|---|---|---|" + ("---|---|" if cpu_times else "")]
    for n, r in res["results"].items():
        row = f"| {n} | {r['wall_ms']:.2f} | {r['wall_ratio']:.3f} |"
        if cpu_times:
            row += f" {r['cpu_ms']:.2f} | {r['cpu_ratio']:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, choices=[8192, 65536], default=None,
                   help="GPU anchor config (default: the CPU reference model)")
    p.add_argument("--quantizer", choices=["lucidrains", "syncfree"], default="lucidrains")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="CPU reference batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--interleave", choices=["step", "block"], default=None,
                   help="step: configurations alternate every step, each step timed (CPU default); "
                        "block: --steps of one configuration, then the next, synchronised per block (CUDA default)")
    p.add_argument("--only", nargs="*", help="configurations to run (unmonitored always included)")
    p.add_argument("--sync-check", action="store_true")
    p.add_argument("--json", help="write the full results here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    torch.set_num_threads(args.threads)
    if args.only and "unmonitored" not in args.only:
        args.only = ["unmonitored", *args.only]
    if args.sync_check:
        return sync_check(args)  # --device cuda for the real check
    if args.interleave is None:
        args.interleave = "block" if args.device == "cuda" else "step"
    if args.device == "cuda" and args.tokens is None:
        args.tokens = 8192
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res = measure(args)
    head = (f"watch_overhead: {res['device']}, torch {res['torch']}, {res['quantizer']} quantizer, "
            f"{res['tokens_per_step']} tokens/step, K={res['K']}, {res['rounds']} rounds x "
            f"{res['steps_per_round']} steps, {res['interleave']}-interleaved, {res['date']}")
    print(head)
    print(markdown(res, cpu_times=args.device == "cpu"))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if all(math.isfinite(r["wall_ms"]) for r in res["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
