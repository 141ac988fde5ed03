"""The Lightning callback under a real `lightning.Trainer` (CPU, a few seconds per fit).

The callback must record what `vqdoctor.watch` records for the same training in a plain loop,
send its metrics to the trainer's logger, raise alerts, stop the training when asked to, name
the cause of a collapse in its report, and carry its state through a checkpoint.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")
import torch  # noqa: E402
from models import BATCH, LR, STEPS, autoencoder, comparable, data, plain_loop  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import vqdoctor  # noqa: E402
from vqdoctor.integrations.lightning import VQDoctorAlert, VQDoctorCallback  # noqa: E402
from vqdoctor.live.store import load_records  # noqa: E402

FLUSH = 20


class Lit(L.LightningModule):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0])["loss"]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR)


def fit(tmp: Path, callback: VQDoctorCallback, *, collapse: bool = True, max_steps: int = -1,
        ckpt_path: str | None = None, module: Lit | None = None) -> tuple[L.Trainer, Lit, list]:
    module = module or Lit(autoencoder(collapse))
    trainer = L.Trainer(max_epochs=1 if max_steps < 0 else -1, max_steps=max_steps, accelerator="cpu",
                        devices=1, logger=L.pytorch.loggers.CSVLogger(tmp / "logs", name="csv"),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    loader = DataLoader(TensorDataset(data()), batch_size=BATCH, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module, list(caught)


def alerts(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, VQDoctorAlert)]


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    cb = VQDoctorCallback(tmp / "run", flush_every=FLUSH)
    trainer, module, alerts = fit(tmp, cb)
    return {"tmp": tmp, "callback": cb, "trainer": trainer, "module": module, "alerts": alerts}


def test_records_match_a_plain_watched_loop(collapsed, tmp_path):
    module = Lit(autoencoder(True))
    with vqdoctor.watch(module, tmp_path / "plain", flush_every=FLUSH) as doctor:
        plain_loop(module, data(), doctor)
    _, lightning = load_records(collapsed["tmp"] / "run")
    _, plain = load_records(tmp_path / "plain")
    a, b = comparable(lightning), comparable(plain)
    assert len(a) > 2 * STEPS and any(r["t"] == "hist" for r in a)  # step, run, hist records
    assert [r["step"] for r in a if r["t"] == "step"] == list(range(STEPS))
    assert a == b


def test_metrics_reach_the_logger(collapsed):
    cb, trainer = collapsed["callback"], collapsed["trainer"]
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    rows = list(csv.DictReader(path.open()))
    key = "vqdoctor/net.ae.quantizer/perplexity"
    logged = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    _, streams = load_records(cb.doctor.run_dir if cb.doctor else collapsed["tmp"] / "run")
    recorded = {r["step"]: r["perplexity"] for r in streams[0] if r["t"] == "step"}
    assert sorted(logged) == list(range(STEPS))  # every step, sent at the flush cadence
    assert logged == pytest.approx(recorded)
    assert any(r.get("vqdoctor/run/loss") for r in rows)
    assert "vqdoctor/net.ae.quantizer/usage_window" in trainer.callback_metrics


def test_collapse_is_diagnosed_alerted_and_reported(collapsed):
    cb = collapsed["callback"]
    assert cb.report.diagnosis.id == "scale-mismatch"
    assert any("ALERT VQ003 scale-mismatch" in m for m in alerts(collapsed["alerts"]))
    run = collapsed["tmp"] / "run"
    assert {p.name for p in cb.core.report_paths} == {"report.txt", "report.json", "report.html"}
    assert "diagnosis: scale-mismatch" in (run / "report.txt").read_text()
    assert '"series"' in (run / "report.json").read_text()
    assert 'data-chart="perplexity"' in (run / "report.html").read_text()
    meta, _ = load_records(run)
    assert meta["status"] == "finished"


def test_fail_on_error_stops_the_training(tmp_path):
    cb = VQDoctorCallback(tmp_path / "run", flush_every=FLUSH, fail_on="error", reports=())
    trainer, _, _ = fit(tmp_path, cb)
    assert cb.stop_reason is not None and cb.stop_reason.severity == "error"
    assert FLUSH <= trainer.global_step < STEPS  # stopped after the first flush that alerted
    assert cb.report is not None and cb.core.report_paths == []


def test_state_survives_a_checkpoint_and_resume(collapsed, tmp_path):
    trainer = collapsed["trainer"]
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]["VQDoctorCallback"]
    assert state["step"] == STEPS and ["scale-mismatch", "net.ae.quantizer"] in state["alerted"]
    resumed = VQDoctorCallback(tmp_path / "resumed", flush_every=FLUSH, reports=())
    _, _, caught = fit(tmp_path, resumed, max_steps=STEPS + FLUSH, ckpt_path=str(ckpt))
    _, streams = load_records(tmp_path / "resumed")
    steps = [r["step"] for r in streams[0] if r["t"] == "step"]
    assert steps[0] == STEPS and steps[-1] == STEPS + FLUSH - 1  # numbered on from the checkpoint
    assert not any("scale-mismatch" in m for m in alerts(caught))  # raised before the resume


class NoVQ(Lit):
    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()


def test_a_model_without_quantizers_trains_unharmed(tmp_path):
    cb = VQDoctorCallback(tmp_path / "run", flush_every=FLUSH, reports=())
    trainer, _, caught = fit(tmp_path, cb, module=NoVQ(torch.nn.Linear(8, 8)))
    assert trainer.global_step == STEPS
    assert any("no quantizer found" in str(w.message) for w in caught)
    assert cb.report is not None and cb.report.quantizers == []
