"""VQ006 index-collapse: perplexity relative to min(K, n) and top-1 share, counts/probe/run."""

from __future__ import annotations

import math

import torch
from rules_kit import assign, check, checkpoint, frame, gen, measured, one, qev, run, state

RULE = "index-collapse"


def uniform_over(m: int, K: int = 1000) -> torch.Tensor:
    counts = torch.zeros(K)
    counts[:m] = 10.0
    return counts


def test_two_codes_from_real_assignments():
    g = gen(0)
    K, D = 512, 16
    cb = torch.randn(K, D, generator=g)
    z = torch.cat([cb[3].repeat(700, 1), cb[7].repeat(300, 1)]) + 1e-3 * torch.randn(1000, D, generator=g)
    counts = torch.bincount(assign(z, cb), minlength=K).float()
    f = one(RULE, checkpoint(measured(state(cb, counts=counts))))
    expected = math.exp(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))
    assert (f.id, f.severity) == ("index-collapse", "error")
    assert math.isclose(f.evidence["perplexity"], expected, rel_tol=1e-6)
    assert math.isclose(f.evidence["top1_share"], 0.7, rel_tol=1e-6)


def test_uniform_usage_is_silent():
    f = check(RULE, checkpoint(measured(state(torch.randn(1000, 8), counts=uniform_over(1000)))))
    assert f == []


def test_near_warn_perplexity_fraction():
    cb = torch.randn(1000, 8, generator=gen(1))
    assert check(RULE, checkpoint(measured(state(cb, counts=uniform_over(51))))) == []
    f = one(RULE, checkpoint(measured(state(cb, counts=uniform_over(49)))))
    assert f.severity == "warning"
    assert math.isclose(f.evidence["perplexity"], 49.0, rel_tol=1e-6)


def test_small_codebook_is_not_flagged_for_being_small():
    cb = torch.randn(4, 2, generator=gen(2))
    assert check(RULE, checkpoint(measured(state(cb, counts=torch.full((4,), 5.0))))) == []


def test_probe_collapse_beats_healthy_history():
    q = qev({"perplexity": 800.0, "top1_share": 0.002, "probe_perplexity": 1.7,
             "probe_top1_share": 0.83, "probe_tokens": 4096.0}, K=1024)
    f = one(RULE, checkpoint(q))
    assert (f.severity, f.evidence["source"], f.confidence) == ("error", "probe_perplexity", 0.8)
    assert "probe" in f.fix


def test_run_per_batch_perplexity_is_judged_against_the_batch_size():
    # 15 effective codes of a 256-vector batch is 5.9% of min(K, n): healthy for that batch size,
    # though it is 1.5% of K = 1024
    q = qev(series=frame(perplexity=[15.0] * 10, tokens=[256] * 10), K=1024)
    assert check(RULE, run(q)) == []
    q = qev(series=frame(perplexity=[12.0] * 10, tokens=[256] * 10), K=1024)
    assert one(RULE, run(q)).severity == "warning"


def test_run_collapse_onset():
    steps = range(0, 300, 10)
    perp = [200.0] * 10 + [1.5] * 20
    f = one(RULE, run(qev(series=frame(steps, perplexity=perp, tokens=[256] * 30), K=1024)))
    assert (f.step, f.severity, f.evidence["perplexity"]) == (100, "error", 1.5)


def test_collapsed_inputs_make_index_collapse_the_root():
    """A saturated sigmoid head maps every input to one corner of the cube: the probe has no
    spread, one code takes everything and the others die because one point is all the data."""
    from vqdoctor.rules import run_rules

    g = gen(5)
    K, D = 256, 16
    cb = torch.randn(K, D, generator=g)
    point = (torch.rand(D, generator=g) > 0.5).float()
    z = point + 1e-9 * torch.randn(2048, D, generator=g)
    q = measured(state(cb, kind="vq"), probe=z)
    f = one(RULE, checkpoint(q))
    assert (f.severity, f.confidence) == ("error", 0.9)
    assert f.message.startswith("encoder outputs collapsed to a point")
    assert f.evidence["z_spread"] < 1e-6 and f.evidence["explains"] == ["dead-codes", "replacement-churn", "codebook-redundancy"]
    findings, _ = run_rules(checkpoint(q))
    assert [(x.id, x.caused_by) for x in findings if x.severity != "info"][:2] == [
        ("index-collapse", None), ("dead-codes", "index-collapse")]
    # spread-out inputs collapsed by the codebook: a symptom, dead codes explain it
    spread = measured(state(cb, kind="vq"), probe=cb[:2].repeat(1024, 1) + 0.01 * torch.randn(2048, D, generator=g))
    f = one(RULE, checkpoint(spread))
    assert "collapsed to a point" not in f.message and "explains" not in f.evidence
    findings, _ = run_rules(checkpoint(spread))
    assert [(x.id, x.caused_by) for x in findings][:2] == [("dead-codes", None), ("index-collapse", "dead-codes")]


def test_saturated_inputs_make_index_collapse_the_root():
    """A tanh head driven into its bounds: the inputs sit on a few corners of the box (spread
    left, so not "collapsed to a point"), a few codes take everything."""
    from vqdoctor.rules import run_rules

    g = gen(6)
    K, D = 64, 8
    cb = 0.3 * torch.randn(K, D, generator=g)
    corners = torch.sign(torch.randn(3, D, generator=g))
    z = torch.tanh(40.0 * (corners[torch.randint(0, 3, (2048,), generator=g)]
                           + 0.05 * torch.randn(2048, D, generator=g)))
    q = measured(state(cb, kind="vq"), probe=z)
    assert q.metrics["z_saturated"] > 0.9 and q.metrics["z_spread"] > 0.1
    f = one(RULE, checkpoint(q))
    assert f.severity == "error" and f.message.startswith("encoder outputs saturated")
    assert f.evidence["explains"] == ["dead-codes", "replacement-churn", "codebook-redundancy"]
    findings, _ = run_rules(checkpoint(q))
    assert [(x.id, x.caused_by) for x in findings if x.severity != "info"][:2] == [
        ("index-collapse", None), ("dead-codes", "index-collapse")]
    # the same head before it saturates: continuous outputs, nothing at the bound
    calm = measured(state(cb, kind="vq"), probe=torch.tanh(0.5 * torch.randn(2048, D, generator=g)))
    assert calm.metrics["z_saturated"] < 0.01


def test_rows_unchanged_bound_the_perplexity_of_a_gradient_codebook():
    # 4 of 512 rows moved between the checkpoints: at most 4 codes were selected
    f = one(RULE, checkpoint(qev({"rows_unchanged_fraction": 508 / 512}, kind="vq", K=512)))
    assert (f.severity, f.evidence["source"], f.evidence["perplexity"]) == ("error", "rows_unchanged_fraction", 4.0)
    assert f.message.startswith("at most 4 of 512 codes selected")
    assert check(RULE, checkpoint(qev({"rows_unchanged_fraction": 0.5}, kind="vq", K=512))) == []
    assert check(RULE, checkpoint(qev({"rows_unchanged_fraction": 508 / 512}, kind="vq-ema", K=512))) == []


def test_checkpoint_mode_never_imports_pandas():
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from vqdoctor.quantizers.base import QuantizerState\n"
            "from vqdoctor.metrics.codebook import codebook_metrics\n"
            "from vqdoctor.sources.checkpoint import evidence_from_states\n"
            "from vqdoctor.rules import run_rules\n"
            "c = torch.zeros(64); c[:2] = 10.0\n"
            "s = QuantizerState('q', 'vq-ema', 'generic', 64, 4, codebook=torch.randn(1, 64, 4), cluster_size=c[None])\n"
            "f, e = run_rules(evidence_from_states([s], {'q': codebook_metrics(s)}))\n"
            "assert e == [] and 'index-collapse' in [x.id for x in f], (f, e)\n"
            "print('pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
