"""No host-device synchronisation between flushes (CUDA only).

Monitored training steps run under `torch.cuda.set_sync_debug_mode("error")`: any
synchronising call raises. The quantizer is a sync-free EMA VQ (vector-quantize-pytorch
synchronises by itself twice per step), so anything that synchronises here is the watch's. A
synchronisation inside a watch hook would be caught by the hook guard (the training goes on), so
the test also checks that no probe was disabled and that every cadence signal was recorded.
Covered in the checked region: first-forward set-up, per-step counting, five cadence steps
(statistics, drift snapshot, nearest-code geometry, straight-through gradient hooks, gradient
norms in the optimizer pre-step hook), the loss copy, and a train-mode no_grad forward (the
eval-mutation probe). The flush (the one allowed synchronisation) happens after the region.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vqdoctor
from tests.watch.watch_models import QuantAE, SyncFreeEMAQuantizer, make_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_monitored_steps_do_not_synchronise(tmp_path):
    torch.manual_seed(0)
    model = QuantAE(SyncFreeEMAQuantizer(16, 64), unpack=lambda o: (o[0], o[1])).cuda()
    data = [x.cuda() for x in make_data(44, batch=32)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step(x: torch.Tensor) -> torch.Tensor:
        y, aux = model(x)
        loss = F.mse_loss(y, x) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for x in data[:2]:  # cuBLAS handles, allocator: outside the check and outside the watch
        step(x)
    torch.cuda.synchronize()
    doctor = vqdoctor.watch(model, tmp_path / "run", flush_every=100, stats_every=10).start()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, x in enumerate(data[2:]):
            doctor.step(loss=step(x))
            if i == 15:
                with torch.no_grad():  # train mode under no_grad: mutates the EMA buffers
                    model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    disabled = sorted(doctor._recorder._disabled)
    events = [e["message"] for e in doctor._recorder.events]
    doctor.close()
    assert not disabled and not events, events
    df = vqdoctor.load_run(tmp_path / "run")
    q = df[df.quantizer == "quantizer"]
    assert sorted(q["step"]) == list(range(42))
    for name in ("z_norm_median", "nearest_dist_median", "codebook_rms_change", "st_grad_ratio",
                 "nonfinite_buffers"):
        assert q[name].notna().sum() >= 4, name
    assert q["eval_mutation"].max() >= 1
    run = df[df.quantizer == ""]
    assert run["grad_norm_encoder"].notna().sum() >= 4 and run["loss"].notna().all()
