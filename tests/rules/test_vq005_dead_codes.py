"""VQ005 dead-codes: counts, probe, optimizer state, FSQ/LFQ and run series, relative to n/K."""

from __future__ import annotations

import torch
from rules_kit import assign, check, checkpoint, frame, gen, measured, one, qev, run, state

RULE = "dead-codes"


def counts_state(counts: torch.Tensor, D: int = 8, **kw):
    return state(torch.randn(counts.numel(), D, generator=gen(9)), counts=counts, **kw)


def test_counts_from_real_assignments_warning():
    g = gen(0)
    K, D = 1024, 64
    cb = torch.randn(K, D, generator=g)
    z = cb[:4].repeat(1024, 1) + 0.01 * torch.randn(4096, D, generator=g)  # 4 clusters only
    counts = torch.bincount(assign(z, cb), minlength=K).float()
    s = state(cb, counts=counts)
    f = one(RULE, checkpoint(measured(s)))
    assert (f.id, f.severity) == ("dead-codes", "warning")  # the collapse itself is index-collapse's error
    assert f.evidence["dead_codes"] == 1020
    assert f.evidence["dead_fraction"] == 1020 / 1024
    assert f.evidence["count_expected"] == 4.0
    assert f.message.startswith("1,020/1,024 codes dead (99.6%)")
    assert "64 to 8-32" in f.fix  # a 64-d lookup: lower the dimension


def test_near_the_info_and_warning_fractions():
    counts = torch.full((1000,), 4.0)
    counts[:249] = 0.0
    assert check(RULE, checkpoint(measured(counts_state(counts)))) == []
    counts[:250] = 0.0  # a quarter unused: worth knowing, with what published models use
    f = one(RULE, checkpoint(measured(counts_state(counts))))
    assert (f.severity, f.evidence["dead_codes"]) == ("info", 250)
    assert "published models" in f.message and f.evidence["published_utilization"]
    counts[:799] = 0.0
    assert one(RULE, checkpoint(measured(counts_state(counts)))).severity == "info"
    counts[:800] = 0.0  # most of the codebook wasted
    f = one(RULE, checkpoint(measured(counts_state(counts))))
    assert (f.severity, f.evidence["dead_codes"]) == ("warning", 800)


def test_relative_to_expected_count_not_absolute():
    # every code below 1 hit, but all near the expected n/K = 0.5: none dead
    counts = torch.full((1024,), 0.5)
    counts[::2] = 0.45
    assert check(RULE, checkpoint(measured(counts_state(counts)))) == []


def test_uninitialised_kmeans_named_in_fix():
    counts = torch.zeros(512)
    counts[:10] = 50.0
    f = one(RULE, checkpoint(measured(counts_state(counts, initted=False))))
    assert "initted is False" in f.fix


def test_probe_needs_enough_tokens():
    g = gen(1)
    K, D = 256, 16
    cb = torch.randn(K, D, generator=g)
    few = cb[:8].repeat(100, 1)  # 800 vectors < 4 x 256
    # too few to count dead codes: no verdict on them, only the note that usage was not measured
    note = one(RULE, checkpoint(measured(state(cb, kind="vq"), probe=few)))
    assert (note.severity, note.evidence["probe_tokens"], note.evidence["tokens_needed"]) == ("info", 800, 1024)
    assert "fewer than 4 x K = 1,024" in note.message
    many = cb[:8].repeat(200, 1)  # 1600 >= 4 x 256
    f = one(RULE, checkpoint(measured(state(cb, kind="vq"), probe=many)))
    assert (f.evidence["source"], f.evidence["dead_codes"]) == ("probe_dead_fraction", 248)


def test_probe_worse_than_counts_wins():
    q = qev({"dead_fraction": 0.1, "probe_dead_fraction": 0.9, "probe_tokens": 1e5}, K=512)
    f = one(RULE, checkpoint(q))
    assert (f.severity, f.evidence["source"], f.confidence) == ("warning", "probe_dead_fraction", 0.75)


def test_optimizer_rows_without_gradient():
    K, D = 128, 8
    v = torch.rand(K, D, generator=gen(2))
    v[:80] = 0.0  # Adam exp_avg_sq exactly 0: rows never selected
    s = state(torch.randn(K, D, generator=gen(3)), kind="vq", optimizer={"exp_avg_sq": v})
    f = one(RULE, checkpoint(measured(s)))
    assert f.evidence["source"] == "optim_rows_no_grad_fraction"
    assert f.evidence["dead_fraction"] == 80 / 128


def test_fsq_unused_levels_and_lfq_stuck_bit():
    f = one(RULE, checkpoint(qev({"fsq_level_usage_min": 0.2}, kind="fsq", K=1000, D=3)))
    assert (f.severity, round(f.evidence["dead_fraction"], 6)) == ("warning", 0.8)
    f = one(RULE, checkpoint(qev({"lfq_bit_balance_min": 0.0}, kind="lfq", K=1024, D=10)))
    assert f.evidence["dead_fraction"] == 0.5
    assert check(RULE, checkpoint(qev({"lfq_bit_balance_min": 0.5}, kind="lfq", K=1024))) == []


def test_run_onset_sustained_and_still_dead():
    steps = range(0, 500, 10)
    dead = [0.1] * 20 + [0.8] * 30
    f = one(RULE, run(qev(series=frame(steps, dead_fraction=dead))))
    assert (f.step, f.severity, f.evidence["dead_fraction"]) == (200, "warning", 0.8)


def test_run_transient_is_silent():
    dead = [0.1] * 20 + [0.6] * 2 + [0.1] * 20  # two rows < sustain_steps, and gone at the end
    assert check(RULE, run(qev(series=frame(dead_fraction=dead)))) == []


def test_run_usage_window_skips_short_windows():
    K = 512
    usage = [0.1] * 10 + [0.2] * 10
    tokens = [1000] * 10 + [4096] * 10  # only the last 10 rows saw >= 4K vectors
    f = one(RULE, run(qev(series=frame(usage_window=usage, window_tokens=tokens), K=K)))
    assert (f.step, f.evidence["source"], f.severity) == (10, "usage_window", "warning")
    assert f.evidence["dead_fraction"] == 0.8


def test_probe_dead_share_is_counted_against_the_reachable_codes():
    # 4K uniform draws reach 98.2% of the codes: the 1.8% they miss are not dead codes
    q = qev({"probe_dead_fraction": 0.30, "probe_usage_fraction": 0.70, "probe_usage_expected": 0.982,
             "probe_tokens": 2048.0}, K=512)
    f = one(RULE, checkpoint(q))
    assert f.evidence["dead_fraction"] == 1 - 0.70 / 0.982
    assert f.evidence["probe_usage_expected"] == 0.982
    assert check(RULE, checkpoint(qev({"probe_dead_fraction": 0.26, "probe_usage_fraction": 0.74,
                                       "probe_usage_expected": 0.982, "probe_tokens": 2048.0}, K=512))) == []


def test_rows_unchanged_between_checkpoints_of_a_gradient_codebook():
    q = qev({"codebook_size": 4096.0, "rows_unchanged_fraction": 0.966}, kind="vq", K=4096)
    f = one(RULE, checkpoint(q))
    assert (f.severity, f.evidence["source"], f.confidence) == ("warning", "rows_unchanged_fraction", 0.7)
    assert "never selected" in f.message
    # EMA rows move without being selected (counts judge them); a codebook that never moved at all
    # is frozen-codebook's
    assert check(RULE, checkpoint(qev({"rows_unchanged_fraction": 0.9}, kind="vq-ema"))) == []
    assert check(RULE, checkpoint(qev({"rows_unchanged_fraction": 1.0}, kind="vq"))) == []


def test_no_usage_evidence_is_an_info_note_not_health():
    g = gen(30)
    cb = torch.randn(512, 8, generator=g)
    note = one(RULE, checkpoint(measured(state(cb, kind="vq"))))
    assert note.severity == "info" and note.message.startswith("code usage not measured")
    assert "--probe" in note.fix and note.evidence["tokens_needed"] == 2048
    fsq = one(RULE, checkpoint(qev({"codebook_size": 4375.0}, kind="fsq", K=4375)))
    assert fsq.severity == "info" and "FSQ" in fsq.message
    # any usage evidence, or a run, and the note goes
    assert check(RULE, checkpoint(measured(state(cb, kind="vq"), probe=cb.repeat(4, 1)))) == []
    assert check(RULE, checkpoint(qev({"codebook_size": 512.0, "rows_unchanged_fraction": 0.1}, kind="vq"))) == []
    assert check(RULE, checkpoint(measured(state(cb, counts=torch.ones(512))))) == []
    assert check(RULE, run(qev({"codebook_size": 512.0}, kind="vq"))) == []
