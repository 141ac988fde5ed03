"""The Hugging Face callback under a real `transformers.Trainer` (CPU, accelerate underneath).

Same records as `vqdoctor.watch` over a plain loop of the same training; the metrics merged
into `logs` reach the Trainer's own TensorBoard reporter (read back with tensorboard's reader);
`fail_on` stops the training; the collapse's cause is named in the report.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import torch  # noqa: E402
from models import BATCH, LR, STEPS, autoencoder, comparable, data  # noqa: E402

import vqdoctor  # noqa: E402
from vqdoctor.integrations.transformers import VQDoctorAlert, VQDoctorCallback  # noqa: E402
from vqdoctor.live.store import load_records  # noqa: E402

FLUSH = 20
QNAME = "ae.quantizer"


class Samples(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i]}


def train(tmp: Path, callback: VQDoctorCallback, *, report_to: str = "none", max_steps: int = STEPS):
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "out"), per_device_train_batch_size=BATCH, max_steps=max_steps,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        optim="adamw_torch", train_sampling_strategy="sequential", logging_steps=FLUSH,
        save_strategy="no", report_to=report_to, use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=autoencoder(True), args=args, train_dataset=Samples(data()),
                                   callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, [str(w.message) for w in caught if issubclass(w.category, VQDoctorAlert)]


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    cb = VQDoctorCallback(tmp / "run", flush_every=FLUSH)
    import os

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tmp / "tb")
    try:
        trainer, alerts = train(tmp, cb, report_to="tensorboard")
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]
    return {"tmp": tmp, "callback": cb, "trainer": trainer, "alerts": alerts}


def test_records_match_a_plain_watched_loop(collapsed, tmp_path):
    model = autoencoder(True)
    x = data()
    with vqdoctor.watch(model, tmp_path / "plain", flush_every=FLUSH):
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        for i in range(0, len(x), BATCH):
            out = model(x[i:i + BATCH])
            out["loss"].backward()
            opt.step()
            model.zero_grad()
    _, hf = load_records(collapsed["tmp"] / "run")
    _, plain = load_records(tmp_path / "plain")
    a = comparable(hf)
    assert [r["step"] for r in a if r["t"] == "step"] == list(range(STEPS))
    assert any("grad_norm_encoder" in r for r in a)
    # the callback also records the loss (from the model's output); the plain loop gave none
    assert [r["loss"] for r in a if r["t"] == "run" and "loss" in r]
    strip = [{k: v for k, v in r.items() if k != "loss"} for r in a]
    assert [r for r in strip if len(r) > 2] == [r for r in comparable(plain) if len(r) > 2]


def test_metrics_reach_the_trainers_reporters(collapsed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    key = f"vqdoctor/{QNAME}/perplexity"
    events = EventAccumulator(str(collapsed["tmp"] / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert f"train/{key}" in tags and f"train/vqdoctor/{QNAME}/usage_window" in tags
    assert "train/loss" in tags  # the Trainer's own metric, beside ours
    logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
    assert sorted(logged) == list(range(FLUSH, STEPS + 1, FLUSH))  # at every logging step
    _, streams = load_records(collapsed["tmp"] / "run")
    recorded = {r["step"]: r["perplexity"] for r in streams[0] if r["t"] == "step"}
    # logged at global step s (s optimizer steps done): the last recorded step, s - 1
    assert logged == pytest.approx({s: recorded[s - 1] for s in logged}, rel=1e-6)


def test_collapse_is_diagnosed_and_reported(collapsed):
    cb = collapsed["callback"]
    assert cb.report.diagnosis.id == "scale-mismatch"
    assert any("scale-mismatch" in m for m in collapsed["alerts"])
    assert (collapsed["tmp"] / "run" / "report.html").is_file()


def test_fail_on_error_stops_the_training(tmp_path):
    cb = VQDoctorCallback(tmp_path / "run", flush_every=FLUSH, fail_on="error", reports=())
    trainer, _ = train(tmp_path, cb)
    assert cb.stop_reason is not None and cb.stop_reason.severity == "error"
    assert trainer.state.global_step == FLUSH
