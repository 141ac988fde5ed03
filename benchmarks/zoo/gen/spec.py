"""Scenario specs of the generated zoo: drawn from a seed, split by seed, ablated into twins.

A spec is a JSON-able dict that fixes everything a run does: the library and quantizer kind,
the fault (or a healthy, possibly imperfect, recipe) and its mechanism, K, D, the data (number of
modes, intrinsic dimension, scale), the attribute names, the call pattern (one forward, separate
top-level calls, evaluation passes, gradient accumulation, a final probe call, a hand-written
optimizer), the checkpoint container, the probe layout and the library version. `gen/train.py`
builds and trains exactly that; nothing else is random (every generator is seeded from the spec).

`twin(spec)` is the same spec with the fault removed (same seed, data, names, pattern,
container): the ablation that `confirm.py` compares against. Pure Python, no torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from typing import Any

# the stable failure ids this zoo generates (rank-desync needs two processes: legacy set only)
FAULTS = ("non-finite", "loss-divergence", "scale-mismatch", "ema-divergence", "dead-codes",
          "index-collapse", "no-encoder-gradient", "frozen-codebook", "codebook-redundancy",
          "replacement-churn")
VQP_VERSIONS = ("1.34.1", "1.32.0")

# kind -> library, how the codebook learns, residual stages
KINDS: dict[str, dict[str, Any]] = {
    "lucid-vq": {"library": "vector-quantize-pytorch", "learn": "ema", "weight": 3.0},
    "lucid-cos": {"library": "vector-quantize-pytorch", "learn": "ema", "weight": 1.2},
    "lucid-rvq": {"library": "vector-quantize-pytorch", "learn": "ema", "stages": (2, 3), "weight": 1.5},
    "lucid-fsq": {"library": "vector-quantize-pytorch", "learn": "none", "weight": 1.0},
    "lucid-lfq": {"library": "vector-quantize-pytorch", "learn": "none", "weight": 0.8},
    "lucid-simvq": {"library": "vector-quantize-pytorch", "learn": "grad", "weight": 1.0},
    "encodec-vq": {"library": "encodec", "learn": "ema", "weight": 0.8},
    "encodec-rvq": {"library": "encodec", "learn": "ema", "stages": (2, 4), "weight": 1.0},
    "hf-dac": {"library": "transformers", "learn": "grad", "weight": 1.0},
    "hf-dac-rvq": {"library": "transformers", "learn": "grad", "stages": (2, 3), "weight": 0.7},
    "diffusers-vq": {"library": "diffusers", "learn": "grad", "weight": 1.2},
    "taming-vq2": {"library": "taming-style", "learn": "grad", "weight": 1.0},
    "zalando-ema": {"library": "zalando-style", "learn": "ema", "weight": 1.0},
    "rosinality-ema": {"library": "rosinality-style", "learn": "ema", "weight": 1.0},
    "custom-vq": {"library": "custom", "learn": "grad", "weight": 1.0},
    "custom-ema": {"library": "custom", "learn": "ema", "weight": 1.0},
}
LUCID = {k for k, v in KINDS.items() if v["library"] == "vector-quantize-pytorch"}
EMA = {k for k, v in KINDS.items() if v["learn"] == "ema"}
GRAD = {k for k, v in KINDS.items() if v["learn"] == "grad"}
CODEBOOK = EMA | GRAD
HANDWRITTEN = {"taming-vq2", "zalando-ema", "rosinality-ema", "custom-vq", "custom-ema"}
KMEANS = {"lucid-vq", "lucid-cos", "lucid-rvq", "encodec-vq", "encodec-rvq"}  # library k-means init
ALL = set(KINDS)

# fault -> mechanism -> kinds it applies to
MECHANISMS: dict[str, dict[str, set[str]]] = {
    "non-finite": {"inf-log": ALL, "nan-rows": ALL},
    "loss-divergence": {"lr-spike": ALL - {"lucid-lfq"}},
    "scale-mismatch": {"uniform-init": {"diffusers-vq", "taming-vq2", "custom-vq"},
                       "raw-scale": {"lucid-vq", "lucid-rvq", "custom-ema", "rosinality-ema"},
                       "norm-growth": {"lucid-cos"}},
    "ema-divergence": {"eval-mutation": EMA, "zero-counts": {"zalando-ema", "rosinality-ema", "custom-ema"}},
    "dead-codes": {"highdim-init": CODEBOOK - {"lucid-simvq", "zalando-ema"}},
    "index-collapse": {"saturated-encoder": ALL},
    "no-encoder-gradient": {"detach": ALL, "no-st": HANDWRITTEN},
    "frozen-codebook": {"decay-one": EMA, "not-in-optimizer": GRAD, "requires-grad-off": GRAD - {"lucid-simvq"}},
    # encodec is left out of churn: its expiry rewrites `embed`, which the EMA update then
    # overwrites from `embed_avg` (encodec #61), so it never replaces anything
    "codebook-redundancy": {"init-with-replacement": {"diffusers-vq", "taming-vq2", "custom-vq", "hf-dac"}},
    "replacement-churn": {"threshold-too-high": {"lucid-vq", "lucid-rvq"}},
}
HEALTHY_VARIANTS: dict[str, set[str]] = {
    "plain": ALL,
    "partial-usage": {"lucid-vq", "lucid-rvq", "encodec-vq", "encodec-rvq", "custom-ema", "hf-dac"},
    "outlier-row": {"lucid-vq", "lucid-rvq", "encodec-vq", "encodec-rvq"},
    "early-lowmass": {"lucid-vq", "lucid-cos", "lucid-rvq"},
}
NAMES = {  # attribute (single pattern) or variable (separate pattern) names; some say nothing
    "encoder": ("encoder", "enc", "block1", "features", "backbone", "f"),
    "quantizer": ("vq", "quantizer", "quantize", "bottleneck", "block2", "m", "mid", "tok"),
    "decoder": ("decoder", "dec", "block3", "head", "g", "out"),
}
CONTAINERS_SINGLE = ("raw", "model", "model_state_dict", "lightning", "module-prefix", "orig_mod-prefix",
                     "safetensors", "numpy-extras")
CONTAINERS_SEPARATE = ("parts", "quantizer-only", "numpy-extras")
PROBES = ("tensor", "tensor-seq", "dict-named", "dict-neutral")
FSQ_LEVELS = ([8, 5, 5, 5], [8, 6, 5], [5, 5, 5, 5], [8, 8, 8], [4, 4, 4, 4], [7, 5, 5])


def split_of(seed: int) -> str:
    """'holdout' for a third of the seeds (a stable hash, not seed % 3), else 'tune'."""
    h = int(hashlib.sha256(f"vqdoctor-zoo-split:{seed}".encode()).hexdigest(), 16)
    return "holdout" if h % 3 == 0 else "tune"


def _pick(rng: random.Random, items: Any, weights: list[float] | None = None) -> Any:
    items = sorted(items) if isinstance(items, set) else list(items)
    return rng.choices(items, weights=weights, k=1)[0]


def draw(seed: int) -> dict[str, Any]:
    """The scenario spec of `seed` (deterministic: the same seed always gives the same spec)."""
    rng = random.Random(f"vqdoctor-zoo:{seed}")
    # healthy 30%; otherwise the fault class first (classes balanced), then a kind it applies to
    healthy = rng.random() < 0.3
    fault = "healthy" if healthy else _pick(rng, FAULTS)
    kinds = sorted(KINDS) if healthy else sorted(set().union(*MECHANISMS[fault].values()))
    kind = rng.choices(kinds, weights=[KINDS[k]["weight"] for k in kinds], k=1)[0]
    info = KINDS[kind]
    if healthy:
        mechanism = None
        variant = _pick(rng, [v for v, ks in HEALTHY_VARIANTS.items() if kind in ks])
    else:
        mechanism = _pick(rng, [m for m, ks in MECHANISMS[fault].items() if kind in ks])
        variant = "plain"
    libver = _pick(rng, VQP_VERSIONS) if kind in LUCID else None
    stages = rng.randint(*info["stages"]) if "stages" in info else 1

    # sizes: small enough for a few seconds of CPU training, K against the tokens per step
    tokens = _pick(rng, (512, 1024, 2048))
    if kind == "lucid-fsq":
        levels = _pick(rng, FSQ_LEVELS)
        K, D = math.prod(levels), _pick(rng, (16, 32))
    elif kind == "lucid-lfq":
        levels, bits = None, _pick(rng, (6, 8, 9))
        K, D = 2 ** bits, _pick(rng, (16, 32))
    else:
        levels = None
        K = _pick(rng, (64, 128, 256) if stages > 1 else (64, 128, 256, 512, 1024))
        D = _pick(rng, (8, 16, 32, 64) if kind not in ("hf-dac", "hf-dac-rvq") else (16, 32))
    codebook_dim = _pick(rng, (4, 8)) if kind in ("hf-dac", "hf-dac-rvq") else None
    steps = rng.randint(150, 220)
    d_in = _pick(rng, (16, 24, 40))
    if d_in == D:
        d_in += 8
    seq = _pick(rng, (16, 32, 64))
    data = {
        "kind": _pick(rng, ("mixture", "manifold")),
        "d_in": d_in,
        "modes": int(max(16, min(2048, K * _pick(rng, (0.5, 1, 2, 4))))),
        "intrinsic": rng.randint(6, 12),
        "noise": _pick(rng, (0.1, 0.2, 0.3)),
        "scale": _pick(rng, (0.5, 1.0, 2.0)),
        "seq": seq,
    }
    hp: dict[str, Any] = {
        "hidden": _pick(rng, (64, 128)),
        "act": _pick(rng, ("gelu", "relu", "silu")),
        "lr": _pick(rng, (1e-3, 2e-3)),
        "codebook_lr_mult": 10.0,  # gradient-trained codebooks: Lancucki et al. 2020 practice
        "commitment": _pick(rng, (0.25, 0.5, 1.0)),
        "decay": _pick(rng, (0.8, 0.9, 0.95)),
        # codebook init: "data" (library k-means, or rows seeded from encoder outputs),
        # "library" (the library's own default), "randn" (N(0, 1) rows)
        "init": "data",
        "enc_out": "linear",
        "replacement": 0.0,  # dead-code replacement threshold (library units, set below)
        "early_step": _pick(rng, (10, 20, 40)),
    }
    if kind in ("lucid-vq", "lucid-rvq") and (libver == "1.34.1" or tokens / K >= 16) and rng.random() < 0.5:
        hp["replacement"] = 2.0  # 1.32: EMA count below 2 with >= 16 expected hits per code and step
    if kind.startswith("encodec"):
        hp["replacement"] = 2.0  # encodec's default expiry (threshold_ema_dead_code=2)
    pattern = {
        "separate": rng.random() < 0.3,
        "nested": rng.random() < 0.2,
        "eval_every": _pick(rng, (0, 0, 25, 40)),
        "accum": _pick(rng, (1, 1, 1, 2, 4)),
        "probe_call": rng.random() < 0.3,
        "manual_optim": rng.random() < 0.1,
    }
    names = {role: _pick(rng, opts) for role, opts in NAMES.items()}
    if len(set(names.values())) < 3:
        names = {"encoder": "encoder", "quantizer": names["quantizer"] if names["quantizer"] not in
                 ("encoder", "decoder") else "vq", "decoder": "decoder"}
    if pattern["separate"]:
        container = _pick(rng, CONTAINERS_SEPARATE)
        pattern["nested"] = False
    else:
        container = _pick(rng, CONTAINERS_SINGLE)
    if kind == "lucid-fsq" and container == "quantizer-only":
        container = "parts"  # FSQ stores only projections: a prefix is needed for --quantizer
    probe = _pick(rng, PROBES)
    fault_params: dict[str, Any] = {}
    onset = 0

    # --- the fault's mechanism: what it changes (train.py applies `fault_params`) --------
    if fault == "non-finite":
        onset = rng.randint(40, 80)
        fault_params = {"rate": _pick(rng, (0.005, 0.01, 0.02))}
    elif fault == "loss-divergence":
        onset = rng.randint(60, 100)
        fault_params = {"gamma": 100.0}
        hp["lr"] = 1e-3
    elif mechanism == "raw-scale":  # codes N(0, s) with s from normalised data; the data come raw
        hp["init"] = "randn-scaled"
        fault_params = {"gain": _pick(rng, (30.0, 50.0, 100.0)), "offset": _pick(rng, (5.0, 20.0))}
        data["kind"] = "mixture"
    elif mechanism == "uniform-init":
        fault_params = {}
    elif mechanism == "norm-growth":  # cosine lookup, no commitment: nothing bounds |z|
        hp["lr"] = 1e-2
        hp["commitment"] = 0.0
        fault_params = {"fix": "layernorm"}  # the twin ends the encoder in a LayerNorm
    elif mechanism == "eval-mutation":
        onset = 24
        pattern["eval_every"] = 25
        fault_params = {"gain": _pick(rng, (3.0, 4.0)), "offset": _pick(rng, (1.0, 2.0)), "batches": 5}
    elif mechanism == "zero-counts":
        fault_params = {}
    elif fault == "dead-codes":  # the fault (train.py): no k-means / data init, N(0, 1) codes,
        hp["enc_out"] = "layernorm"  # no replacement; scales match: |z| ~ sqrt(D) ~ |N(0, 1) codes|
        if kind in ("lucid-vq", "lucid-rvq", "lucid-cos") and (libver == "1.34.1" or tokens / K >= 16):
            hp["replacement"] = 2.0  # the twin's recipe re-seeds dead codes
        data.update(kind="manifold", intrinsic=rng.randint(2, 4))
        if K < 256:
            K = 256 if stages == 1 else K
        D = max(D, 16)
    elif fault == "index-collapse":
        hp["enc_out"] = "tanh"
        data["kind"] = "pixels"
        fault_params = {"gain": 255.0}
    elif fault == "frozen-codebook" and mechanism == "decay-one":
        fault_params = {"decay": 1.0}
    elif fault == "codebook-redundancy":
        fault_params = {"n_init": max(4, K // 16)}
        if K < 256:
            K = 256
    elif fault == "replacement-churn":
        K = max(K, 512 if stages == 1 else 256)
        tokens = 512
        fault_params = {"threshold": 2.0, "ratio": 0.9}
        hp["replacement"] = round(0.1 * tokens / K, 4)  # the fix: a threshold below the expected count
    if fault == "healthy":
        if variant == "partial-usage":  # random codes, many modes: a third to half unused, fine
            hp["init"] = "randn"
            hp["enc_out"] = "layernorm"
            data.update(kind="mixture", modes=max(16, int(K * _pick(rng, (0.5, 0.7)))))
            D = min(D, 16) if D > 8 else D
        elif variant == "outlier-row":  # one corrupted sample in the k-means batch, re-seeded
            fault_params = {"outlier_gain": 100.0}
            K = min(K, 64 if libver == "1.32.0" else 128)  # 1.32: >= 32 hits per code at threshold 2
            tokens = 2048
            hp["init"] = "data"
            hp["replacement"] = 2.0
            hp["early_step"] = 0
        elif variant == "early-lowmass":
            hp["decay"] = 0.99
            hp["early_step"] = _pick(rng, (2, 3, 5))
    if kind in ("zalando-ema", "rosinality-ema", "custom-ema"):
        hp["decay"] = max(hp["decay"], 0.9)
    if kind.startswith("encodec"):
        # encodec's k-means init stores centroids (not centroid x count) in embed_avg, so the
        # first updates shrink every code towards 0; at decay 0.95 most never recover
        hp["decay"] = min(hp["decay"], 0.9)
    if kind == "lucid-lfq":
        hp["commitment"] = 0.25
    seq = data["seq"]
    while tokens % (seq * pattern["accum"]):
        pattern["accum"] = 1
    if kind in KMEANS:
        # the k-means batch (one micro-batch) must hold >= 2 K vectors, or it samples duplicates;
        # encodec's expiry at an EMA count of 2 needs >= 8 vectors per code and step
        per_code = 8 if kind.startswith("encodec") and mechanism != "threshold-too-high" else 2
        while K > 64 and K > tokens // pattern["accum"] // per_code:
            if tokens < 2048:
                tokens *= 2
            else:
                K //= 2
    spec = {
        "id": f"g{seed:04d}",
        "seed": seed,
        "split": split_of(seed),
        "kind": kind,
        "library": info["library"],
        "libver": libver,
        "learn": info["learn"],
        "fault": fault,
        "expect": "healthy" if fault == "healthy" else fault,
        "mechanism": mechanism,
        "variant": variant,
        "onset": onset,
        "K": K, "D": D, "stages": stages, "levels": levels, "codebook_dim": codebook_dim,
        "tokens_per_step": tokens,
        "steps": steps,
        "data": data,
        "hp": hp,
        "pattern": pattern,
        "names": names,
        "container": container,
        "probe": probe,
        "fault_params": fault_params,
        "twin": False,
    }
    spec["inspect_args"] = inspect_args(spec)
    return spec


def quantizer_prefix(spec: dict[str, Any]) -> str:
    """Key prefix of the quantizer in the (unwrapped) checkpoint: what `--quantizer` names."""
    q = spec["names"]["quantizer"]
    if spec["pattern"]["separate"]:
        return "" if spec["container"] == "quantizer-only" else q
    return f"tok.{q}" if spec["pattern"]["nested"] else q


def inspect_args(spec: dict[str, Any]) -> list[str]:
    """Options a checkpoint of this kind needs (FSQ stores nothing of its levels)."""
    if spec["kind"] == "lucid-fsq":
        return ["--quantizer", quantizer_prefix(spec), "--levels", ",".join(map(str, spec["levels"]))]
    return []


def expected_quantizers(spec: dict[str, Any]) -> list[dict[str, int]]:
    """What a report should list: `count` codebooks of `K` codes (residual stages count apart)."""
    return [{"K": int(spec["K"]), "count": int(spec["stages"])}]


def twin(spec: dict[str, Any]) -> dict[str, Any]:
    """The ablated twin: the same run with the fault removed (a healthy spec stays itself)."""
    t = copy.deepcopy(spec)
    if spec["fault"] == "healthy":
        return t
    t["twin"] = True
    t["id"] = spec["id"] + "-twin"
    return t


def spec_hash(spec: dict[str, Any]) -> str:
    """Content hash of a spec (cache key of its outputs)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def draw_many(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Specs of seeds start .. start + n - 1."""
    return [draw(s) for s in range(start, start + n)]
