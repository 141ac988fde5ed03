"""HTML formats (reports and gate results), gate golden files, reference values, chart series.

HTML goldens are structure-level: the page is parsed and its outline (title, section ids, chart
ids, finding order) compared with `tests/golden/*.html.json`; every chart the series can draw
must be an `<svg data-chart>` with drawn content. In a real headless Chromium (when installed)
the page must load with no console message and every chart in the DOM
(`benchmarks/html_check.py`). Regenerate goldens on purpose with `VQDOCTOR_UPDATE_GOLDEN=1`.
"""

from __future__ import annotations

import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_formats import failing_report, healthy_report

from vqdoctor.formats import GATE_FORMATS
from vqdoctor.formats import format as render
from vqdoctor.formats.html import chart_ids
from vqdoctor.gate import Check, GateResult, GateThresholds, Status
from vqdoctor.results.model import QuantizerSeries, ReportSeries
from vqdoctor.results.reference import reference_for
from vqdoctor.results.series import rank_frequency, with_series

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("VQDOCTOR_UPDATE_GOLDEN", "") not in ("", "0")
GATE_SUFFIX = {"text": "txt", "json": "json", "junit": "xml", "github": "github", "markdown": "md"}
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def series_report():
    """The failing sample with chart data: a 2-stage residual group, 4 heads on stage 1."""
    steps = list(range(0, 200, 10))
    falling = [max(1.0, 60 * 0.8 ** i) for i in range(len(steps))]
    stage0 = QuantizerSeries(
        steps=steps, metrics={"perplexity": falling, "perplexity_fraction": [p / 1024 for p in falling],
                              "usage_window": [None, None] + [0.5 * 0.9 ** i for i in range(18)],
                              "dead_fraction": [None, None] + [1 - 0.5 * 0.9 ** i for i in range(18)],
                              "scale_ratio": [9e5 if i % 2 == 0 else None for i in range(20)]},
        rank_frequency=rank_frequency([1000, 20, 5] + [0] * 1021),
        code_norms={"edges": [0.0, 0.001, 0.002, 0.003], "counts": [1000, 20, 4]})
    stage1 = QuantizerSeries(
        steps=steps, metrics={"perplexity": [800.0] * 20, "perplexity_fraction": [0.78] * 20,
                              "usage_window": [0.97] * 20, "dead_fraction": [0.03] * 20},
        rank_frequency=rank_frequency(list(range(1024, 0, -1))),
        head_usage={"steps": steps, "heads": 4, "usage": [[0.9, 0.95, 1.0, 0.5]] * 20})
    run = {"steps": steps, "loss": [2.0 * 1.3 ** i for i in range(20)]}
    return with_series(failing_report(), ReportSeries(
        quantizers={"quantizer.layers.0": stage0, "quantizer.layers.1": stage1}, run=run))


class Outline(HTMLParser):
    """Title, section ids, chart ids (with whether each holds drawn content), finding ids."""

    def __init__(self) -> None:
        super().__init__()
        self.title, self.sections, self.charts, self.findings = "", [], [], []
        self._in_title = False
        self._chart: str | None = None
        self.drawn: dict[str, bool] = {}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "title" and not self.title and self._chart is None:
            self._in_title = True
        if tag in ("section", "h2") and a.get("id"):
            self.sections.append(a["id"])
        if tag == "svg" and "data-chart" in a:
            self._chart = a["data-chart"]
            self.charts.append(self._chart)
            self.drawn[self._chart] = False
        if self._chart and tag in ("polyline", "rect", "circle"):
            self.drawn[self._chart] = True
        if tag == "li" and a.get("id", "").startswith("finding-"):
            self.findings.append(a["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def outline(text: str) -> dict:
    p = Outline()
    p.feed(text)
    return {"title": p.title, "sections": p.sections, "charts": p.charts, "findings": p.findings,
            "undrawn": [c for c, ok in p.drawn.items() if not ok]}


def golden(name: str, got: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(got, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with VQDOCTOR_UPDATE_GOLDEN=1"
    assert got == path.read_text(encoding="utf-8")


# --- reports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["series", "healthy"])
def test_html_outline_golden(name: str) -> None:
    report = series_report() if name == "series" else healthy_report()
    text = render(report, "html")
    got = outline(text)
    assert got["charts"] == chart_ids(report)
    assert got["undrawn"] == []
    golden(f"report_{name}.html.json", json.dumps(got, indent=1) + "\n")


def test_html_draws_every_chart_of_the_series() -> None:
    charts = outline(render(series_report(), "html"))["charts"]
    assert charts == ["perplexity", "usage", "dead-fraction", "scale-ratio", "loss",
                      "stage-grid:quantizer", "head-grid:quantizer.layers.1", "rank-frequency",
                      "code-norms:quantizer.layers.0"]


def test_html_marks_alert_steps_and_is_self_contained() -> None:
    text = render(series_report(), "html")
    assert "VQ003 first held at step 120" in text  # the root cause's onset, marked on the charts
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<script" not in text and "<link" not in text
    assert "Content-Security-Policy" in text and "NaN" not in text
    assert text.endswith("</html>\n")


def test_html_escapes_user_text() -> None:
    report = series_report()
    evil = report.findings[0].__class__(**{**report.findings[0].to_dict(),
                                           "message": "<script>alert(1)</script> & co"})
    text = render(type(report)(report.source, report.quantizers, [evil], series=report.series), "html")
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="chromium not installed")
def test_html_in_a_real_browser(tmp_path) -> None:
    from html_check import check

    path = tmp_path / "report.html"
    path.write_text(render(series_report(), "html"), encoding="utf-8")
    result = check(path)
    assert result["console"] == []
    assert result["rendered"] == chart_ids(series_report()) and result["ok"]


# --- reference values -------------------------------------------------------------------------------


def test_reference_values_by_kind_and_size() -> None:
    near = reference_for({"kind": "vq-ema", "codebook_size": 65536})
    assert {r["model"] for r in near} >= {"VQGAN"} and all(r["codebook_size"] == 65536 for r in near)
    assert all("Table 1" in r["source"] or "abstract" in r["source"] for r in near)
    assert [r["codebook_size"] for r in reference_for({"kind": "vq", "codebook_size": 1024})] == [16384, 16384]
    assert reference_for({"kind": "vq", "codebook_size": 32}) == []  # nothing published near K=32
    assert [r["model"] for r in reference_for({"kind": "fsq", "codebook_size": 240})] == ["FSQ (MaskGIT, UViM)"]
    assert reference_for({"kind": "custom", "codebook_size": 1024}) == []


def test_reference_lines_in_text_markdown_json() -> None:
    report = with_series(failing_report(), None)
    text = render(report, "text")
    assert "reference: VQGAN-FC (factorized codes) K=16384: under 12% of codes used" in text.replace("\n      ", " ")
    assert "reference: " in render(report, "markdown")
    data = json.loads(render(report, "json"))
    assert data["quantizers"][0]["reference"][0]["source"].startswith("Zhu et al. 2024")
    assert "series" not in data


# --- gate results ----------------------------------------------------------------------------------


def gate_sample() -> GateResult:
    report = failing_report()
    checks = (
        Check("quantizer.layers.0", "min_perplexity", Status.FAIL, "perplexity 1.9 < 51.2 (5% of 1024 codes)",
              metric="perplexity", source="checkpoint EMA counts", value=1.9, threshold=51.2,
              threshold_spec="5%", finding=report.findings[1]),
        Check("quantizer.layers.0", "min_usage", Status.FAIL, "codes used 0.4% < 25%", metric="usage_fraction",
              source="checkpoint EMA counts", value=0.004, threshold=0.25, threshold_spec="0.25",
              finding=report.findings[0]),
        Check("quantizer.layers.0", "findings", Status.FAIL, "2 findings at or above error", value=2.0,
              threshold_spec="error", finding=report.findings[0]),
        Check("quantizer.layers.1", "min_perplexity", Status.PASS, "perplexity 870 >= 51.2", metric="perplexity",
              source="checkpoint EMA counts", value=870.2, threshold=51.2, threshold_spec="5%"),
        Check("quantizer.layers.1", "max_dead_fraction", Status.SKIP, "not measurable: no usage window"),
    )
    return GateResult(target="runs/vq/checkpoints/epoch=3-step=120.ckpt", kind="checkpoint",
                      thresholds=GateThresholds(fail_on="error"), checks=checks, report=report,
                      notes=("thresholds from pyproject.toml",))


@pytest.mark.parametrize("fmt", list(GATE_SUFFIX))
def test_gate_golden(fmt: str) -> None:
    golden(f"gate_failing.{GATE_SUFFIX[fmt]}", render(gate_sample(), fmt, width=80, color=False))


def test_gate_html() -> None:
    text = render(gate_sample(), "html")
    got = outline(text)
    assert got["title"] == "vqdoctor gate failed"
    assert got["sections"][:2] == ["gate", "checks"] and "findings" in got["sections"]
    assert text.count('class="st-FAIL"') == 3 and text.count('class="st-skip"') == 1
    golden("gate_failing.html.json", json.dumps(got, indent=1) + "\n")


def test_every_gate_format_is_registered() -> None:
    assert set(GATE_FORMATS) == set(GATE_SUFFIX) | {"html"}
    assert all(cls.result == "gate" for cls in GATE_FORMATS.values())
