"""TensorBoard and W&B export of a watched run, read back with each tool's own files.

TensorBoard event files are read with tensorboard's `EventAccumulator`; W&B runs offline
(`WANDB_MODE=offline`, no network): its run summary and the table file of the rank-frequency plot
are read back. The launcher's `--tensorboard` is exercised on a script that never imports vqdoctor.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from models import autoencoder, data, plain_loop

import vqdoctor
from vqdoctor.errors import ConfigError
from vqdoctor.integrations.export import TensorBoardExporter, WandbExporter, build_exporters
from vqdoctor.live.store import load_records

FLUSH = 20
TAG = "vqdoctor/ae.quantizer/perplexity"


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_code_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    model = autoencoder(True)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=FLUSH, tensorboard=tmp_path / "tb") as doctor:
        plain_loop(model, data(), doctor)
    _, streams = load_records(tmp_path / "run")
    recorded = {r["step"]: r["perplexity"] for r in streams[0] if r["t"] == "step"}
    acc = events(tmp_path / "tb")
    scalars = {e.step: e.value for e in acc.Scalars(TAG)}
    assert scalars == pytest.approx(recorded, rel=1e-6)  # every step, written at the flushes
    assert "vqdoctor/run/loss" in acc.Tags()["scalars"]
    hists = acc.Histograms("vqdoctor/ae.quantizer/code_counts")
    tokens = {r["step"]: sum(r["counts"]) for r in streams[0] if r["t"] == "hist"}
    assert [h.step for h in hists] == sorted(tokens)
    assert [h.histogram_value.num for h in hists] == [tokens[s] for s in sorted(tokens)]


def test_wandb_offline_run_gets_scalars_and_rank_frequency(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    exporter = WandbExporter(project="vqdoctor-test", dir=str(tmp_path), rank_every=1)
    summary: dict = {}
    finish = exporter.close

    def close() -> None:  # the offline run's summary is readable until it is finished
        summary.update(dict(exporter.run.summary))
        finish()

    exporter.close = close
    model = autoencoder(True)
    with vqdoctor.watch(model, tmp_path / "run", flush_every=FLUSH, exporters=[exporter]) as doctor:
        plain_loop(model, data(), doctor)
    assert exporter.own and exporter.flushes >= 6
    _, streams = load_records(tmp_path / "run")
    last = [r for r in streams[0] if r["t"] == "step"][-1]
    assert summary[TAG] == pytest.approx(last["perplexity"])
    assert summary["vqdoctor/step"] == last["step"]
    tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/vqdoctor/ae.quantizer/rank_frequency*.json"))
    assert len(tables) == exporter.flushes
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["rank", "share"]
    shares = [row[1] for row in table["data"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1


def test_exporters_need_their_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'vqdoctor\[tensorboard\]'"):
        TensorBoardExporter("tb")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'vqdoctor\[wandb\]'"):
        build_exporters(wandb=True)
    assert build_exporters(tensorboard="tb", wandb=True, rank=1) == []  # rank 0 exports


SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from models import autoencoder, data, BATCH
import torch
model = autoencoder(True)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
x = data(40)
for i in range(0, len(x), BATCH):
    out = model(x[i:i + BATCH])
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
"""


def test_launcher_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from vqdoctor.live.launcher import run_watched

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(here=str(Path(__file__).parent))))
    run = run_watched([sys.executable, str(script)], tmp_path / "run", flush_every=FLUSH,
                      tensorboard=tmp_path / "tb")
    assert run.exit_code == 0 and run.report is not None
    scalars = events(tmp_path / "tb").Scalars(TAG)
    assert [e.step for e in scalars] == list(range(40))
