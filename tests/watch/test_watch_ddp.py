"""Data parallel: 2 CPU ranks (gloo) under torchrun, each recording its own stream.

The ranks train DDP replicas whose EMA codebooks are *not* synchronised (vector-quantize-pytorch
`sync_codebook=False`, `broadcast_buffers=False`) on different data, so their codebooks drift
apart: the report must aggregate usage across ranks exactly and flag `rank-desync`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vqdoctor

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import vqdoctor
    from tests.watch.watch_models import QuantAE, lucid_vq, make_data, train
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = QuantAE(lucid_vq(codebook_size=32, kmeans_init=False, threshold_ema_dead_code=0, decay=0.8,
                             sync_codebook=False))
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    counts = []
    model.quantizer.register_forward_hook(
        lambda m, a, out: counts.append(torch.bincount(out[1].reshape(-1), minlength=32)))
    with vqdoctor.watch(ddp, {run!r}, flush_every=10, stats_every=5) as doctor:
        train(ddp, make_data(30, seed=10 + rank), doctor=doctor)
    torch.save(torch.stack(counts), {out!r} + f"/counts{{rank}}.pt")
    dist.destroy_process_group()
""")


def test_two_ranks_aggregate_exactly_and_flag_desync(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(root=str(ROOT), run=str(run), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["world_size"] == 2

    df = vqdoctor.load_run(run)
    assert sorted(set(df["rank"])) == [0, 1]
    fps = [json.loads(x) for x in (run / "rank1.jsonl").read_text().splitlines() if '"t":"fp"' in x]
    # one fingerprint per cadence step (stats_every=5), so ranks are compared at the cadence
    assert [f["step"] for f in fps] == [0, 5, 10, 15, 20, 25]

    report = vqdoctor.report(run)
    assert report.source["world_size"] == 2
    # global usage over the window (it covers all 30 steps) from the summed hist records of both ranks
    total = torch.load(tmp_path / "counts0.pt").sum(0) + torch.load(tmp_path / "counts1.pt").sum(0)
    p = total.double() / total.sum()
    ref = math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))
    metrics = report.quantizers[0].metrics
    assert math.isclose(metrics["perplexity_window"], ref, rel_tol=1e-9)
    assert metrics["window_tokens"] == float(total.sum())
    assert metrics["rank_codebook_max_diff"] > 1e-2
    assert report.findings[0].id == "rank-desync", [(f.id, f.message) for f in report.findings]
    assert report.findings[0].step <= 5  # dated at the cadence, not at the first flush (step 9)
