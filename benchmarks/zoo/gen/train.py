"""Build and train one generated scenario for real, on the CPU, and write its files.

    python benchmarks/zoo/gen/train.py --spec SPEC.json --out DIR [--twin]

`SPEC.json` is a spec from `spec.draw` (or the spec itself as a JSON string). `--twin` trains
the ablated twin: the same run with the fault switched off. Writes into DIR:

- `early.pt` / `final.pt` (`.safetensors` for that container): the checkpoint in the drawn
  container (raw state dict, `{'model': ..}`, `{'model_state_dict': ..}`, Lightning-style
  `{'state_dict': ..}`, `module.` / `_orig_mod.` prefixes, safetensors, numpy arrays and scalars
  beside the weights, per-part dicts or the quantizer's own state dict for separate calls);
- `probe.pt`: encoder outputs (the quantizer's input) on held-out data, as `[N, D]`, `[B, T, D]`,
  a dict keyed by the quantizer's name, or a dict whose keys name no quantizer;
- `reference.json`: the run's own measurements (`reference.Recorder`) and the files written.

Never imports vqdoctor. One thread, seeded: a watched and an unwatched run are the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantizers  # noqa: E402
from reference import Recorder  # noqa: E402
from spec import quantizer_prefix  # noqa: E402

ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def settings(spec: dict[str, Any]) -> SimpleNamespace:
    """The effective settings of this run: the shared recipe, with the fault applied unless twin."""
    hp, fp, mech = spec["hp"], spec["fault_params"], spec["mechanism"]
    on = not spec["twin"]  # the fault is switched on
    m = mech if on else None
    s = SimpleNamespace(
        init=hp["init"], decay=hp["decay"], commitment=hp["commitment"], replacement=hp["replacement"],
        replacement_ratio=0.1, counts_init=1.0, straight_through=True, lr=hp["lr"], gamma=None,
        detach=False, exclude_codebook=False, freeze_codebook=False, eval_shift=None, eval_train_mode=False,
        raw=None, pixel_gain=1.0, corrupt=None, init_from=None, outlier=None,
        enc_out=hp["enc_out"], fault_on=on and spec["fault"] != "healthy")
    fault = spec["fault"]
    if fault == "loss-divergence":
        s.gamma = fp["gamma"] if on else 0.01  # MultiStepLR's gamma is a multiplier; 0.01 was meant
    if fault == "non-finite":
        s.corrupt = {"how": mech, "rate": fp["rate"], "onset": spec["onset"], "guarded": not on}
    if m == "uniform-init":
        s.init = "library"
    if m == "raw-scale":
        s.raw = (fp["gain"], fp["offset"])
    if mech == "norm-growth" and not on:
        s.enc_out = fp["fix"]
    if mech == "eval-mutation":
        s.eval_shift = (fp["gain"], fp["offset"], fp["batches"])
        s.eval_train_mode = on
    if m == "zero-counts":
        s.counts_init = 0.0
    if m == "highdim-init":
        s.init = "randn"
    if mech == "decay-one" or m in ("highdim-init", "threshold-too-high"):
        s.replacement = 0.0  # decay-one: both sides (replacement moves codes); else the fault's part
    if m == "detach":
        s.detach = True
    if m == "no-st":
        s.straight_through = False
    if m == "decay-one":
        s.decay = 1.0
    if m == "not-in-optimizer":
        s.exclude_codebook = True
    if m == "requires-grad-off":
        s.freeze_codebook = True
    if m == "init-with-replacement":
        s.init_from = fp["n_init"]
    if m == "threshold-too-high":
        s.replacement, s.replacement_ratio = fp["threshold"], fp["ratio"]
    if fault == "index-collapse" and on:
        s.pixel_gain = fp["gain"]  # raw 0-255 pixels into a tanh-ended encoder (the /255 went to the target)
    if spec["variant"] == "outlier-row":
        s.outlier = fp["outlier_gain"]
    return s


class Source:
    """Seeded synthetic data: Gaussian mixture, a curved low-dimensional manifold, or 'pixels'."""

    def __init__(self, spec: dict[str, Any], seed: int):
        d = spec["data"]
        self.kind, self.d_in, self.seq = d["kind"], d["d_in"], d["seq"]
        self.g = torch.Generator().manual_seed(seed)
        self.scale, self.noise = d["scale"], d["noise"]
        if self.kind == "mixture":
            self.centres = torch.randn(d["modes"], self.d_in, generator=self.g) * self.scale
        else:
            self.r = d["intrinsic"]
            self.A = torch.randn(self.r, self.d_in, generator=self.g) / math.sqrt(self.r)

    def sample(self, n: int, gain: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        B = max(1, n // self.seq)
        g = self.g
        if self.kind == "mixture":
            c = torch.randint(len(self.centres), (B, self.seq), generator=g)
            x = self.centres[c] + self.noise * self.scale * torch.randn(B, self.seq, self.d_in, generator=g)
        elif self.kind == "manifold":
            s = torch.randn(B, self.seq, self.r, generator=g)
            x = self.scale * torch.tanh(1.5 * s @ self.A) + 0.02 * torch.randn(B, self.seq, self.d_in, generator=g)
        else:  # pixels in (0, 1)
            s = torch.randn(B, self.seq, self.r, generator=g)
            x = torch.sigmoid(2.0 * s @ self.A)
        return gain * x + offset


class Pipeline:
    """Input transforms of the training script (where the input faults live)."""

    def __init__(self, s: SimpleNamespace, seed: int):
        self.s = s
        self.g = torch.Generator().manual_seed(seed + 7)  # corruption masks: never shifts the clean data

    def __call__(self, x: torch.Tensor, step: int, first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        if s.raw is not None:
            x = s.raw[0] * x + s.raw[1]  # the normalisation step was left out
        target = x
        if s.pixel_gain != 1.0:
            x = x * s.pixel_gain
        if s.outlier and first:
            x = x.clone()
            x[0, 0] = x[0, 0] * s.outlier  # one corrupted sample in the first (k-means) batch
            target = x
        c = s.corrupt
        if c is not None:
            rows = torch.rand(x.shape[:-1], generator=self.g) < (c["rate"] if step >= c["onset"] else 0.0)
            if c["how"] == "inf-log":
                e = torch.exp(x)
                e[rows] = 0.0  # digitally silent frames
                x = torch.log(e.clamp_min(1e-6)) if c["guarded"] else torch.log(e)
            else:
                x = x.clone()
                x[rows] = float("nan")  # missing values
                if c["guarded"]:
                    x = torch.nan_to_num(x, nan=0.0)
            target = x
        return x, target


def mlp(d_in: int, hidden: int, d_out: int, act: str, out: str = "linear") -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), ACTS[act](), nn.Linear(hidden, d_out)]
    if out == "layernorm":
        layers.append(nn.LayerNorm(d_out))
    elif out == "tanh":
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Model(nn.Module):
    """Encoder -> quantizer -> decoder under the drawn attribute names (optionally nested)."""

    def __init__(self, enc: nn.Module, handle: quantizers.Handle, dec: nn.Module, names: dict, nested: bool,
                 detach: bool):
        super().__init__()
        self._names, self._nested, self._detach, self._handle = names, nested, detach, handle
        setattr(self, names["encoder"], enc)
        if nested:
            self.tok = nn.Module()
            setattr(self.tok, names["quantizer"], handle.module)
        else:
            setattr(self, names["quantizer"], handle.module)
        setattr(self, names["decoder"], dec)

    def forward(self, x: torch.Tensor):
        z = getattr(self, self._names["encoder"])(x)
        zq, idx, aux = self._handle(z.detach() if self._detach else z)
        return getattr(self, self._names["decoder"])(zq), aux, idx, z


class HandAdam:
    """A hand-written Adam (not a torch.optim.Optimizer: no optimizer-step hooks fire)."""

    def __init__(self, groups: list[dict[str, Any]]):
        self.groups = groups
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.t = 0

    def zero_grad(self) -> None:
        for grp in self.groups:
            for p in grp["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        self.t += 1
        for grp in self.groups:
            lr = grp["lr"] * factor
            for p in grp["params"]:
                if p.grad is None:
                    continue
                m, v = self.state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                mh, vh = m / (1 - 0.9 ** self.t), v / (1 - 0.999 ** self.t)
                p.sub_(lr * mh / (vh.sqrt() + 1e-8))


def save_checkpoint(stem: Path, spec: dict, parts: dict[str, nn.Module], model: nn.Module | None,
                    opt: Any, step: int, losses: list) -> str:
    """Write one checkpoint in the drawn container; returns the file name."""
    import numpy as np

    cont, qname = spec["container"], spec["names"]["quantizer"]
    sd = model.state_dict() if model is not None else None
    opt_sd = opt.state_dict() if hasattr(opt, "state_dict") else {}
    if cont == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(stem) + ".safetensors")
        return stem.name + ".safetensors"
    if cont == "raw":
        obj: Any = sd
    elif cont == "model":
        obj = {"model": sd, "step": step}
    elif cont == "model_state_dict":
        obj = {"model_state_dict": sd, "optimizer_state_dict": opt_sd, "epoch": step // 50}
    elif cont == "lightning":
        obj = {"state_dict": sd, "epoch": step // 50, "global_step": step, "pytorch-lightning_version": "2.4.0",
               "optimizer_states": [opt_sd], "lr_schedulers": []}
    elif cont == "module-prefix":
        obj = {"module." + k: v for k, v in sd.items()}
    elif cont == "orig_mod-prefix":
        obj = {"_orig_mod." + k: v for k, v in sd.items()}
    elif cont == "quantizer-only":
        obj = parts[qname].state_dict()
    elif cont == "parts":
        obj = {name: mod.state_dict() for name, mod in parts.items()}
    elif cont == "numpy-extras":  # an older repository's save helper: numpy beside the weights
        hist = [np.float32(v if v is not None else np.nan) for v in losses[-50:]]
        extras = {"results": {"loss_vals": hist, "perplexities": np.asarray(hist, dtype=np.float64)},
                  "hyperparameters": {"K": spec["K"], "lr": spec["hp"]["lr"]}, "n_updates": np.int64(step)}
        obj = {"model": sd, **extras} if sd is not None else {**{n: m.state_dict() for n, m in parts.items()}, **extras}
    else:
        raise ValueError(cont)
    torch.save(obj, str(stem) + ".pt")
    return stem.name + ".pt"


def write_probe(out: Path, spec: dict, z: torch.Tensor, x: torch.Tensor, handle: quantizers.Handle) -> None:
    """Encoder outputs on held-out data in the drawn probe layout."""
    flat = z.reshape(-1, z.shape[-1]).contiguous()
    kind = spec["probe"]
    if kind == "tensor":
        obj: Any = flat
    elif kind == "tensor-seq":
        obj = z.contiguous()
    elif kind == "dict-named":
        obj = {quantizer_prefix(spec) or spec["names"]["quantizer"]: flat}
    else:  # keys that name no quantizer: the encoder output beside another tensor
        proj = handle.to_code_space(flat)
        if proj.shape[-1] != flat.shape[-1]:
            obj = {"z_e": flat, "z_proj": proj.contiguous()}
        else:
            obj = {"z_e": flat, "x": x.reshape(-1, x.shape[-1]).contiguous()}
    torch.save(obj, out / "probe.pt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="spec JSON file, or the JSON itself")
    ap.add_argument("--out", required=True)
    ap.add_argument("--twin", action="store_true", help="train the ablated twin (fault off)")
    args = ap.parse_args(argv)
    text = args.spec if args.spec.lstrip().startswith("{") else Path(args.spec).read_text()
    spec = json.loads(text)
    if args.twin:
        spec["twin"] = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])
    s = settings(spec)
    K, D, stages, steps, seed = spec["K"], spec["D"], spec["stages"], spec["steps"], spec["seed"]
    pat, names, hp = spec["pattern"], spec["names"], spec["hp"]
    d_in, n = spec["data"]["d_in"], spec["tokens_per_step"]

    enc = mlp(d_in, hp["hidden"], D, hp["act"], s.enc_out)
    handle = quantizers.build(spec, s)
    dec = mlp(D, hp["hidden"], d_in, hp["act"])
    qmod = handle.module
    if pat["separate"]:
        model, parts = None, {names["encoder"]: enc, names["quantizer"]: qmod, names["decoder"]: dec}
    else:
        model = Model(enc, handle, dec, names, pat["nested"], s.detach)
        parts = {names["encoder"]: enc, names["quantizer"]: qmod, names["decoder"]: dec}
    src = Source(spec, seed + 1000)
    eval_src = Source(spec, seed + 2000)
    eval_src.__dict__.update({k: v for k, v in src.__dict__.items() if k in ("centres", "A")})  # same task
    pipe = Pipeline(s, seed)

    def forward(x: torch.Tensor):
        if model is not None:
            return model(x)
        z = enc(x)
        zq, idx, aux = handle(z.detach() if s.detach else z)
        return dec(zq), aux, idx, z

    def set_mode(train: bool, include_quantizer: bool = True) -> None:
        for mod in ([model] if model is not None else [enc, dec] + ([qmod] if include_quantizer else [])):
            mod.train(train)

    # codebook initialisation (libraries with k-means do it themselves at the first forward)
    if handle.set_rows is not None and not (spec["kind"] in ("lucid-vq", "lucid-cos", "lucid-rvq", "encodec-vq",
                                                             "encodec-rvq") and s.init == "data"):
        with torch.no_grad():
            if s.init == "data":
                need = s.init_from or K
                zs = [handle.to_code_space(enc(pipe(src.sample(n), 0)[0]).reshape(-1, D))]
                while sum(len(t) for t in zs) < need:
                    zs.append(handle.to_code_space(enc(pipe(src.sample(n), 0)[0]).reshape(-1, D)))
                z0 = torch.cat(zs)
                if s.init_from:  # K rows drawn with replacement from too few vectors
                    z0 = z0[:s.init_from]
                    rows = z0[torch.randint(len(z0), (K,))]
                else:
                    rows = z0[torch.randperm(len(z0))[:K]]
                handle.set_rows(rows.clone())
            elif s.init in ("randn", "randn-scaled"):
                dc = handle.codebooks()[0].shape[-1]
                rows = torch.randn(K, dc)
                if s.init == "randn-scaled":  # the scale of encoder outputs on normalised data
                    raw, s.raw = s.raw, None
                    z0 = handle.to_code_space(enc(pipe(src.sample(n), 0)[0]).reshape(-1, D))
                    s.raw = raw
                    rows = rows * float(z0.norm(dim=-1).median()) / math.sqrt(dc)
                handle.set_rows(F.normalize(rows, dim=-1) if handle.cosine else rows)
    cbs = handle.codebooks()
    rec = Recorder(K, stages, steps)
    rec.initial(cbs[0] if cbs else None)
    if s.freeze_codebook:
        for p in handle.codebook_params():
            p.requires_grad_(False)

    # optimizer: codebook tensors of gradient-trained codebooks get their own learning rate
    cb_ids = {id(p) for p in handle.codebook_params()}
    all_params = [p for mod in (enc, qmod, dec) for p in mod.parameters()]
    if s.exclude_codebook:  # the optimizer was built from the encoder and decoder only
        all_params = [p for mod in (enc, dec) for p in mod.parameters()]
    mult = hp["codebook_lr_mult"] if spec["kind"] in ("diffusers-vq", "taming-vq2", "custom-vq") else 1.0
    groups = [{"params": [p for p in all_params if id(p) not in cb_ids], "lr": s.lr}]
    cb_params = [p for p in all_params if id(p) in cb_ids]
    if cb_params:
        groups.append({"params": cb_params, "lr": s.lr * mult})
    if pat["manual_optim"]:
        opt: Any = HandAdam(groups)
        sched = None
    else:
        opt = torch.optim.Adam(groups, lr=s.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [spec["onset"]], s.gamma) if s.gamma else None

    accum = pat["accum"]
    micro = n // accum
    files: dict[str, str] = {}
    t0 = time.monotonic()
    for step in range(steps):
        if s.eval_shift or pat["eval_every"]:
            every = 25 if s.eval_shift else pat["eval_every"]
            if step > 0 and step % every == 0:
                gain, offset, nb = s.eval_shift if s.eval_shift else (1.0, 0.0, 3)
                cbs = handle.codebooks()
                before = cbs[0].clone() if cbs else None
                if not s.eval_train_mode:
                    set_mode(False)
                elif model is None:  # separate modules: encoder and decoder switched, quantizer forgotten
                    set_mode(False, include_quantizer=False)
                with torch.no_grad():
                    for _ in range(nb):
                        forward(pipe(eval_src.sample(micro, gain, offset), step)[0])
                set_mode(True)
                cbs = handle.codebooks()
                rec.eval_pass(before, cbs[0] if cbs else None)
        opt.zero_grad()
        total = task_total = 0.0
        z_keep = None
        for a in range(accum):
            x, target = pipe(src.sample(micro), step, first=step == 0 and a == 0)
            recon, aux, idx, z = forward(x)
            task = F.mse_loss(recon, target)
            loss = task + aux
            if a == 0 and (step % 10 == 0 or step < 3):
                g = torch.autograd.grad(task, z, retain_graph=True, allow_unused=True)[0] if z.requires_grad else None
                rec.task_grad(step, g)
            (loss / accum).backward()
            rec.codes(step, idx)
            total += float(loss.detach()) / accum
            task_total += float(task.detach()) / accum
            z_keep = z
        if pat["manual_optim"]:
            opt.step(s.gamma if (s.gamma and step >= spec["onset"]) else 1.0)
        else:
            opt.step()
            if sched is not None:
                sched.step()
        cbs = handle.codebooks()
        code_z = handle.to_code_space(z_keep.detach().reshape(-1, D)) if cbs else z_keep.detach()
        rec.end_step(step, total, task_total, code_z, cbs[0] if cbs else None, z_keep.detach())
        if step == hp["early_step"]:
            files["early"] = save_checkpoint(out / "early", spec, parts, model, opt, step, rec.loss)
    train_s = time.monotonic() - t0
    files["final"] = save_checkpoint(out / "final", spec, parts, model, opt, steps - 1, rec.loss)

    # held-out probe: encoder outputs of the training distribution, through the same input pipeline
    set_mode(False)
    n_probe = int(min(16384, max(4096, 8 * K)))
    with torch.no_grad():
        x, _ = pipe(src.sample(n_probe), steps - 1)
        z = enc(x)
        write_probe(out, spec, z, x, handle)
        if pat["probe_call"]:  # a final call on the probe batch, in eval mode
            forward(x)
    files["probe"] = "probe.pt"
    cbs = handle.codebooks()
    extra = {
        "id": spec["id"], "twin": spec["twin"], "fault_on": s.fault_on, "files": files,
        "train_seconds": round(train_s, 2),
        "versions": {"torch": torch.__version__, "vector-quantize-pytorch": quantizers.vqp_version(),
                     "vqp_file": getattr(sys.modules.get("vector_quantize_pytorch"), "__file__", None)},
        "settings": {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    result = rec.result(cbs[0] if cbs else None, extra)
    (out / "reference.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
