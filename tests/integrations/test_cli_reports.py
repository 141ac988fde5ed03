"""`--format html` for report, inspect and gate; `report --plot`; the launcher options' bad input."""

from __future__ import annotations

import pytest
import torch
from models import autoencoder, data, plain_loop
from typer.testing import CliRunner

import vqdoctor
from vqdoctor.cli import app


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = autoencoder(True)
    with vqdoctor.watch(model, tmp / "run", flush_every=20) as doctor:
        plain_loop(model, data(60), doctor)
    torch.save(model.state_dict(), tmp / "model.pt")
    return tmp


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_report_html_and_plot(recorded, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.html", tmp_path / "r.png"
    res = invoke("report", recorded / "run", "--format", "html", "-o", out, "--plot", png)
    assert res.exit_code == 1  # failing: a finding at or above error
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and 'data-chart="perplexity"' in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_inspect_html_has_the_checkpoint_charts(recorded):
    res = invoke("inspect", recorded / "model.pt", "--format", "html")
    assert res.exit_code in (0, 1)
    assert 'data-chart="code-norms:ae.quantizer"' in res.stdout
    assert 'data-chart="perplexity"' not in res.stdout  # one checkpoint has no steps


def test_gate_html(recorded):
    res = invoke("gate", recorded / "run", "--format", "html")
    assert res.exit_code == 1
    assert "<title>vqdoctor gate failed</title>" in res.stdout and 'id="checks"' in res.stdout


def test_exporter_options_need_a_command(recorded):
    res = invoke("watch", "--tensorboard", recorded / "tb", recorded / "run")
    assert res.exit_code == 2
    assert "--tensorboard and --wandb apply to a command" in res.stderr
