"""Check each generated label against reference measurements, independent of vqdoctor.

A faulty variant is **confirmed** when (1) its ablated twin (same spec and seed, fault off) is
healthy by `health()`, and (2) the pair shows the fault's signature (`signature()`): measured by
the training script from the indices the quantizer returned, the task gradient at its input,
its codebook tensors and the loss (`reference.json`). A healthy variant is confirmed when it
passes `health()` itself. Unconfirmed variants are left out of the scoring and listed with the
reason. Thresholds below are about the *label*, chosen to be far from borderline; they are not
vqdoctor's thresholds and vqdoctor never reads them.
"""

from __future__ import annotations


def _stat(r: dict, key: str, stage: int = 0) -> float:
    return float(r["usage"][stage][key])


def _finite_mean(xs: list) -> float | None:
    v = [x for x in xs if x is not None and abs(x) < 1e299]
    return sum(v) / len(v) if v else None


def _cad(r: dict, key: str) -> list[float]:
    return [c[key] for c in r["cadence"] if c.get(key) is not None]


def _grads(r: dict) -> list[float | None]:
    return [g for _, g in r["task_grad"]]


def reach(r: dict) -> float:
    """Codes a usage window can show: min(K, tokens in the window)."""
    return float(min(r["K"], max(1, r["usage"][0]["window_tokens"])))


def health(r: dict, spec: dict) -> list[str]:
    """Reasons this run is not healthy (empty: healthy). Imperfect usage is fine."""
    why = []
    nf = r["nonfinite"]
    if nf["loss_steps"] or nf["z"] or nf["codebook"]:
        why.append(f"non-finite values (first at step {nf['first_step']})")
    task = r["task_loss"]
    first, last = _finite_mean(task[:3]), _finite_mean(task[-10:])
    if first is None or last is None or not last <= 0.9 * first:
        why.append(f"task loss did not improve ({first} -> {last})")
    ppl, unused = _stat(r, "perplexity"), _stat(r, "unused_fraction")
    if ppl < 0.1 * reach(r):
        why.append(f"perplexity {ppl:.1f} < 10% of {reach(r):.0f}")
    if unused > 0.75:
        why.append(f"{unused:.0%} of codes unused in the last window")
    g = _grads(r)
    if not g or any(v is None or v <= 0 for v in g):
        why.append("the task gradient does not reach the quantizer input at every measured step")
    if spec["learn"] != "none":
        moved = r.get("codebook_moved_rel")
        if moved is None or moved <= 1e-4:
            why.append(f"codebook did not move after initialisation ({moved})")
        blow = _cad(r, "blowup")
        if blow and blow[-1] > 50:
            why.append(f"a code row at {blow[-1]:.3g}x the input norm at the end")
        if (r.get("duplicate_fraction") or 0) > 0.1:
            why.append(f"{r['duplicate_fraction']:.0%} duplicate code rows")
        if (r.get("replaced_late_mean") or 0) > 0.02:
            why.append(f"{r['replaced_late_mean']:.1%} of rows replaced per step")
        if r.get("eval_move_max"):
            why.append("evaluation passes moved the codebook")
    return why


def signature(spec: dict, r: dict, t: dict) -> tuple[bool, str]:
    """Does the faulty run `r` show its fault's signature against its twin `t`?"""
    fault, mech = spec["fault"], spec["mechanism"]
    nf = r["nonfinite"]
    any_nf = bool(nf["loss_steps"] or nf["z"] or nf["codebook"])
    if fault == "non-finite":
        return any_nf, f"non-finite from step {nf['first_step']}: loss steps {nf['loss_steps']}, z {nf['z']}, codebook {nf['codebook']}"
    if fault != "non-finite" and any_nf:
        return False, f"went non-finite at step {nf['first_step']} (label would be ambiguous)"
    if fault == "loss-divergence":
        on = spec["onset"]
        post = [x for x in r["loss"][on:] if x is not None]
        twin_post = _finite_mean(t["loss"][on:])
        pre = _finite_mean(r["loss"][max(0, on - 10):on])
        peak = max(post) if post else 0.0
        ok = twin_post is not None and pre is not None and peak >= 5 * max(twin_post, 1e-12) and peak >= 5 * pre
        return ok, f"loss peak {peak:.3g} after step {on} vs twin mean {twin_post} and {pre} before"
    if fault == "scale-mismatch":
        if mech == "norm-growth":
            zr, zt = _cad(r, "z_raw_norm_median"), _cad(t, "z_raw_norm_median")
            gr, gt = zr[-1] / zr[0], zt[-1] / zt[0]
            return gr >= 5 and gt <= 2, f"|z| grew {gr:.3g}x (twin {gt:.3g}x)"
        sr, st = _cad(r, "scale_ratio"), _cad(t, "scale_ratio")
        r0, t0 = sr[0], st[0]
        pr, pt = _stat(r, "perplexity"), _stat(t, "perplexity")
        mism = r0 >= 10 or r0 <= 0.1
        ok = mism and 1 / 3 <= t0 <= 3 and pr <= 0.7 * pt
        return ok, f"scale ratio at init {r0:.3g} (twin {t0:.3g}); perplexity {pr:.1f} vs twin {pt:.1f}"
    if fault == "ema-divergence":
        if mech == "eval-mutation":
            em, tm = r.get("eval_move_max") or 0.0, t.get("eval_move_max") or 0.0
            step = r.get("train_move_median") or 0.0
            ok = em > 0 and tm == 0 and em >= 0.5 * step
            return ok, f"codebook moved {em:.3g} per code in an evaluation pass (twin {tm:.3g}; a training step {step:.3g})"
        def growth(x: dict) -> float:  # the largest row against the largest row as initialised
            init = x.get("init_code_norm_max")
            return max(_cad(x, "code_norm_max") or [0]) / init if init else 0.0
        gr, gt = growth(r), growth(t)
        return gr >= 100 and gt <= 10, f"largest code row grew {gr:.3g}x its initial norm (twin {gt:.3g}x)"
    if fault == "dead-codes":
        ur, ut = _stat(r, "unused_fraction"), _stat(t, "unused_fraction")
        sr = _cad(r, "scale_ratio_used")
        matched = bool(sr) and 0.2 <= sr[-1] <= 5
        ok = ur >= 0.7 and ut <= ur - 0.3 and matched
        return ok, f"{ur:.0%} unused (twin {ut:.0%}); used-code scale ratio {sr[-1] if sr else None}"
    if fault == "index-collapse":
        pr, pt = _stat(r, "perplexity"), _stat(t, "perplexity")
        ok = pr <= max(4.0, 0.03 * reach(r)) and pt >= 4 * pr
        return ok, f"perplexity {pr:.2f} (twin {pt:.1f}) of {reach(r):.0f} reachable"
    if fault == "no-encoder-gradient":
        gr, gt = _grads(r), _grads(t)
        ok = bool(gr) and all(v == 0 for v in gr) and bool(gt) and all(v is not None and v > 0 for v in gt)
        return ok, f"task gradient at the quantizer input: max {max((v or 0) for v in gr):.3g} (twin min {min((v or 0) for v in gt):.3g})"
    if fault == "frozen-codebook":
        mr, mt = r.get("codebook_moved_rel"), t.get("codebook_moved_rel")
        ok = mr is not None and mt is not None and mr <= 1e-6 and mt >= 1e-3
        return ok, f"codebook moved {mr} relative after init (twin {mt})"
    if fault == "codebook-redundancy":
        dr, dt = r.get("duplicate_fraction") or 0.0, t.get("duplicate_fraction") or 0.0
        return dr >= 0.2 and dt <= 0.05, f"{dr:.0%} duplicate rows (twin {dt:.0%})"
    if fault == "replacement-churn":
        cr, ct = r.get("replaced_late_mean") or 0.0, t.get("replaced_late_mean") or 0.0
        return cr >= 0.02 and ct <= 0.25 * cr, f"{cr:.1%} of rows replaced per step in the second half (twin {ct:.1%})"
    return False, f"no signature for {fault}"


def confirm(spec: dict, r: dict | None, t: dict | None) -> tuple[bool, str]:
    """(confirmed, reason) for one variant, from its reference and its twin's."""
    if r is None:
        return False, "no reference.json (training failed)"
    if spec["fault"] == "healthy":
        why = health(r, spec)
        return (not why), "; ".join(why) or "healthy"
    if t is None:
        return False, "no twin reference.json"
    why = health(t, spec)
    if why:
        return False, "twin not healthy: " + "; ".join(why)
    ok, detail = signature(spec, r, t)
    return ok, detail if ok else "signature not shown: " + detail


def imperfect(r: dict) -> bool:
    """A healthy run in the band the issue names: 30-60% of codes unused or perplexity 35-50% of K."""
    u, p = _stat(r, "unused_fraction"), _stat(r, "perplexity") / max(r["K"], 1)
    return 0.3 <= u <= 0.6 or 0.35 <= p <= 0.5
