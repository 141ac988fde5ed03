"""Report formats on hand-built reports: golden files, width, JSON contract, exhaustiveness.

Regenerate the golden files on purpose with `VQDOCTOR_UPDATE_GOLDEN=1 pytest tests/test_formats.py`.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from vqdoctor.errors import ConfigError
from vqdoctor.formats import FORMATS, Format
from vqdoctor.formats import format as render
from vqdoctor.formats.parts import nesting, sparkline, usage_shares
from vqdoctor.numbers import fmt_num, fmt_pct
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("VQDOCTOR_UPDATE_GOLDEN", "") not in ("", "0")
SUFFIX = {"text": "txt", "json": "json", "markdown": "md"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# --- sample reports (also used by test_cli.py) ------------------------------------------------

COLLAPSED_HIST = [0.98, 0.015, 0.005] + [0.0] * 17
SPREAD_HIST = [0.07, 0.066, 0.064, 0.06, 0.058, 0.056, 0.055, 0.053, 0.05, 0.05, 0.049, 0.047,
               0.045, 0.044, 0.042, 0.04, 0.038, 0.035, 0.03, 0.028]


def _q(name: str, *, kind: str = "vq-ema", k: int = 1024, d: int = 128, heads: int = 1,
       stage: int | None = None, metrics: dict | None = None, histogram: list | None = None,
       notes: list | None = None, library: str = "vector-quantize-pytorch") -> QuantizerReport:
    info = {"name": name, "kind": kind, "library": library, "codebook_size": k, "dim": d,
            "heads": heads, "metric": "euclidean"}
    if stage is not None:
        info.update(group="quantizer", stage=stage)
    return QuantizerReport(info=info, metrics=metrics or {}, histogram=histogram or [],
                           notes=notes or [])


def failing_report() -> Report:
    """The user story: scale mismatch at the root, index collapse under it, a probe given."""
    q0 = _q("quantizer.layers.0", stage=0, histogram=COLLAPSED_HIST, metrics={
        "perplexity": 1.9, "usage_fraction": 0.004, "dead_fraction": 0.996,
        "code_norm_median": 0.001, "z_norm_median": 912.0, "scale_ratio": 9.12e5,
        "top1_share": 0.98, "entropy_norm": float("nan")})
    q1 = _q("quantizer.layers.1", stage=1, heads=4, histogram=SPREAD_HIST,
            metrics={"perplexity": 870.2, "usage_fraction": 0.97, "dead_fraction": 0.03,
                     "code_norm_median": 1.02},
            notes=["EMA decay not stored; assumed the library default 0.8"])
    findings = [
        Finding("scale-mismatch", "VQ003", "error", 0.9, "quantizer.layers.0", 120,
                "encoder outputs are ~9.1e5x larger than the codes: nearest-code assignment "
                "degenerates to the code with the largest norm",
                {"z_norm_median": 912.0, "code_norm_median": 0.001, "scale_ratio": 9.12e5},
                "initialise the codebook from data (kmeans_init=True), normalise encoder "
                "outputs (LayerNorm before the quantizer), or use a cosine-similarity codebook"),
        Finding("index-collapse", "VQ006", "error", 0.95, "quantizer.layers.0", 120,
                "perplexity 1.9 of 1024 codes (0.2%)",
                {"perplexity": 1.9, "usage_fraction": 0.004},
                "fix the cause first; then revive dead codes (threshold_ema_dead_code=2)",
                caused_by="scale-mismatch"),
        Finding("dead-codes", "VQ005", "warning", 0.6, "quantizer.layers.1", None,
                "31 of 1024 codes dead (3%)", {"dead_fraction": 0.03, "dead": 31},
                "enable dead-code replacement (threshold_ema_dead_code)"),
        Finding("codebook-redundancy", "VQ009", "info", 0.3, None, None,
                "effective rank 96 of 128", {"effective_rank": 96.3}, ""),
    ]
    errors = [{"rule": "ema-divergence", "code": "VQ004",
               "message": "rule raised ValueError: shapes [4, 1024] and [1024] do not match"}]
    source = {"kind": "checkpoint", "paths": ["runs/vq/checkpoints/epoch=3-step=120.ckpt"],
              "torch": "2.13.0", "safe_load": True, "format": "torch-zip",
              "container": "state_dict", "probe": "z.pt"}
    return Report(source=source, quantizers=[q0, q1], findings=findings, errors=errors,
                  tool_version="0.1.0")


def healthy_report() -> Report:
    """Nothing wrong, no probe; an FSQ quantizer without usage counts."""
    q0 = _q("vq", k=512, d=64, histogram=SPREAD_HIST,
            metrics={"perplexity": 455.0, "usage_fraction": 1.0, "dead_fraction": 0.0,
                     "code_norm_median": 0.98, "top1_share": 0.004})
    q1 = _q("fsq", kind="fsq", k=240, d=4, metrics={},
            notes=["FSQ stores no codebook; levels from --levels"])
    q1.info["levels"] = [8, 6, 5]
    source = {"kind": "checkpoint", "paths": ["model.safetensors"], "torch": "2.13.0",
              "safe_load": True, "format": "safetensors", "container": ""}
    return Report(source=source, quantizers=[q0, q1], findings=[], tool_version="0.1.0")


def warning_report() -> Report:
    """Warnings only: several checkpoints, an unsafe load, a cause chain two deep, long text."""
    long_name = "model.encoder.blocks.11.attention.output.vector_quantizer_with_a_long_name"
    q0 = _q(long_name, k=8192, d=256, histogram=[5, 0, 0, 3, 2, 1, 0, 40, 9, 0],
            metrics={"perplexity": float("nan"), "usage_fraction": 0.41, "dead_fraction": 0.59,
                     "code_norm_median": 3.5e-05, "codebook_rel_change": 0.0})
    findings = [
        Finding("frozen-codebook", "VQ008", "warning", 0.8, long_name, 3000,
                "the codebook did not move between 3 checkpoints",
                {"codebook_rel_change": 0.0, "checkpoints": ["a.pt", "b.pt", "c.pt"],
                 "per_head": {"h0": 0.0, "h1": float("nan")}},
                "add the codebook to the optimizer, or set requires_grad=True"),
        Finding("dead-codes", "VQ005", "warning", 0.7, long_name, 3000,
                "4833 of 8192 codes dead: https://example.org/a/very/long/url/that/cannot/"
                "be/broken/at/spaces/anywhere/at/all/and/keeps/going",
                {"dead_fraction": 0.59}, "", caused_by="frozen-codebook"),
        Finding("index-collapse", "VQ006", "warning", 0.5, long_name, 3000,
                "usage 41% of 8192", {"usage_fraction": 0.41},
                "see the cause", caused_by="dead-codes"),
        Finding("loss-divergence", "VQ002", "warning", 0.4, None, 2900,
                "loss grew 1e13x in 100 steps", {"loss_max": 1.2e13}, "clip gradients"),
    ]
    source = {"kind": "checkpoint", "paths": ["ck/step1000.pt", "ck/step2000.pt",
                                              "ck/step3000.pt"],
              "torch": "2.13.0", "safe_load": False, "format": "torch-zip"}
    return Report(source=source, quantizers=[q0], findings=findings, tool_version="0.1.0")


SAMPLES = {"failing": failing_report, "healthy": healthy_report, "warning": warning_report}


# --- golden files ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_golden(name: str, fmt: str) -> None:
    got = render(SAMPLES[name](), fmt, width=80, color=False)
    path = GOLDEN / f"{name}.{SUFFIX[fmt]}"
    if UPDATE:
        path.write_text(got, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with VQDOCTOR_UPDATE_GOLDEN=1"
    assert got == path.read_text(encoding="utf-8")


# --- text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [50, 80, 100])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_text_lines_fit_width(name: str, width: int) -> None:
    text = render(SAMPLES[name](), "text", width=width, color=False)
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long
    assert all(line == line.rstrip() for line in text.splitlines())


def test_text_default_width_is_80() -> None:
    assert render(failing_report(), "text") == render(failing_report(), "text", width=80,
                                                      color=False)


def test_text_finding_lines_are_ruff_like() -> None:
    text = render(failing_report(), "text")
    assert ("VQ003 scale-mismatch [error] quantizer.layers.0 @step 120: encoder outputs"
            in text)
    assert "evidence: z_norm_median=912, code_norm_median=0.001, scale_ratio=9.1e+05" in text
    assert "= fix: initialise the codebook from data" in text
    assert "VQ009 codebook-redundancy [info] run: effective rank 96 of 128" in text


def test_text_symptom_nested_under_cause() -> None:
    lines = render(failing_report(), "text").splitlines()
    cause = next(i for i, s in enumerate(lines) if "VQ003 scale-mismatch" in s)
    symptom = next(i for i, s in enumerate(lines) if "VQ006 index-collapse" in s)
    indent = lambda s: len(s) - len(s.lstrip())  # noqa: E731
    assert symptom > cause
    assert indent(lines[symptom]) > indent(lines[cause])
    assert "└─" in lines[symptom]
    caused = next(s for s in lines[symptom:] if "caused by:" in s)
    assert caused.strip() == "caused by: scale-mismatch"
    assert indent(caused) > indent(lines[symptom])


def test_text_chain_nests_deeper() -> None:
    lines = render(warning_report(), "text").splitlines()
    heads = {code: next(s for s in lines if f"{code} " in s and "[warning]" in s)
             for code in ("VQ008", "VQ005", "VQ006", "VQ002")}
    col = {c: s.index(c) for c, s in heads.items()}
    assert col["VQ008"] < col["VQ005"] < col["VQ006"]
    assert col["VQ002"] == col["VQ008"] == 0


def test_text_collapsed_histogram_is_obvious() -> None:
    text = render(failing_report(), "text")
    usage = [s for s in text.splitlines() if s.strip().startswith("usage")]
    collapsed, spread = usage[0], usage[1]
    assert "█" in collapsed and collapsed.count("·") >= 15
    assert "usage █▁▁·················  top 5% of codes take 98% of assignments" in collapsed
    assert "top code 98%" in text
    assert "·" not in spread
    assert "top 5% of codes take 7.1% of assignments" in spread


def test_text_header_and_metrics() -> None:
    text = render(failing_report(), "text")
    assert text.startswith("vqdoctor 0.1.0 · checkpoint runs/vq/checkpoints/")
    assert "torch-zip · safe load · probe z.pt" in text
    assert "quantizer.layers.0  vq-ema  vector-quantize-pytorch  K=1024 D=128 stage=0" in text
    assert "perplexity 1.9 of 1024 · used 0.4% · dead 99.6% · top code 98%" in text
    assert "scale ratio 9.1e+05" in text
    warn = render(warning_report(), "text")
    assert "UNSAFE load" in warn
    assert "ck/step1000.pt ... ck/step3000.pt (3, oldest first)" in warn


def test_text_ends_with_verdict() -> None:
    text = render(failing_report(), "text")
    assert text.splitlines()[-1] == failing_report().summary_line()
    assert "1 error (the analysis is incomplete):" in text
    assert "ema-divergence (VQ004): rule raised ValueError" in text


def test_healthy_says_so_plainly() -> None:
    text = render(healthy_report(), "text")
    assert text.splitlines()[-1] == "healthy: no problems found in 2 quantizers"
    assert "no probe given" in text and "--probe" in text
    assert "usage n/a (no usage counts stored)" in text
    md = render(healthy_report(), "markdown")
    assert md.startswith("## vqdoctor: healthy\n")
    assert "healthy: no problems found in 2 quantizers" in md


def test_probe_hint_not_shown_with_probe() -> None:
    assert "no probe given" not in render(failing_report(), "text")


def test_text_color_only_when_asked() -> None:
    plain = render(failing_report(), "text", color=False)
    colored = render(failing_report(), "text", color=True)
    assert "\x1b[" not in plain
    assert "\x1b[" in colored
    assert ANSI.sub("", colored) == plain


def test_text_color_ignores_no_color_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller (CLI) decides; render(color=True) means colour even if NO_COLOR is set.
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" in render(healthy_report(), "text", color=True)


# --- json ------------------------------------------------------------------------------------

TOP_KEYS = {"schema_version", "tool", "source", "verdict", "quantizers", "findings", "errors", "complete"}
FINDING_KEYS = {"id", "code", "severity", "confidence", "quantizer", "step", "message",
                "evidence", "fix", "caused_by"}


def _no_nan(text: str) -> dict:
    def reject(name: str) -> None:
        raise AssertionError(f"JSON contains {name}")

    return json.loads(text, parse_constant=reject)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_json_is_to_dict(name: str) -> None:
    report = SAMPLES[name]()
    text = render(report, "json")
    assert _no_nan(text) == report.to_dict()
    assert text == json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_json_schema(name: str) -> None:
    data = _no_nan(render(SAMPLES[name](), "json"))
    assert set(data) == TOP_KEYS
    assert data["schema_version"] == 1
    assert data["tool"]["name"] == "vqdoctor" and isinstance(data["tool"]["version"], str)
    assert data["source"]["kind"] in ("checkpoint", "run")
    assert isinstance(data["source"]["paths"], list)
    assert isinstance(data["source"]["safe_load"], bool)
    assert data["verdict"] in ("healthy", "warning", "failing")
    for q in data["quantizers"]:
        assert {"name", "kind", "library", "codebook_size", "dim", "metrics"} <= set(q)
        assert isinstance(q["codebook_size"], int) and isinstance(q["dim"], int)
        assert all(v is None or isinstance(v, (int, float)) for v in q["metrics"].values())
    for f in data["findings"]:
        assert set(f) == FINDING_KEYS
        assert f["severity"] in ("error", "warning", "info")
        assert re.fullmatch(r"VQ\d{3}", f["code"])
        assert isinstance(f["confidence"], float) and 0 <= f["confidence"] <= 1
        assert f["step"] is None or isinstance(f["step"], int)
        assert isinstance(f["evidence"], dict)
        assert f["caused_by"] is None or isinstance(f["caused_by"], str)
    assert isinstance(data["errors"], list)


def test_json_nan_becomes_null() -> None:
    data = _no_nan(render(warning_report(), "json"))
    assert data["quantizers"][0]["metrics"]["perplexity"] is None
    assert data["findings"][0]["evidence"]["per_head"]["h1"] is None
    assert "NaN" not in render(failing_report(), "json")


# --- markdown --------------------------------------------------------------------------------


def test_markdown_layout() -> None:
    md = render(failing_report(), "markdown")
    assert md.startswith("## vqdoctor: failing — scale-mismatch (VQ003)\n")
    assert "| quantizer | kind | library | K | D |" in md
    assert "| `quantizer.layers.0` | vq-ema | vector-quantize-pytorch | 1024 | 128 |" in md
    items = re.findall(r"^(\d+)\. \*\*(VQ\d{3}) ", md, flags=re.M)
    assert [c for _, c in items] == ["VQ003", "VQ006", "VQ005", "VQ009"]
    assert [int(n) for n, _ in items] == [1, 2, 3, 4]
    assert "   - caused by: `scale-mismatch`" in md
    assert "   - evidence: `z_norm_median=912`" in md
    assert "   - fix: initialise the codebook from data" in md
    assert "### Errors" in md


def test_markdown_escapes_user_text() -> None:
    report = failing_report()
    f = report.findings[0]
    evil = Finding(f.id, f.code, f.severity, f.confidence, "a|b", f.step, "x | *y* <b>", {}, "")
    md = render(Report(report.source, report.quantizers, [evil]), "markdown")
    assert r"x \| \*y\* &lt;b&gt;" in md
    assert "`a|b @step 120`" in md


# --- the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(FORMATS))
def test_every_format_renders_every_sample(key: str) -> None:
    cls = FORMATS[key]
    assert issubclass(cls, Format) and cls.name == key and cls.suffix.startswith(".")
    assert cls.result == "report"
    for make in SAMPLES.values():
        report = make()
        out = cls(width=80, color=False).render(report)
        assert out.endswith("\n") and not out.endswith("\n\n")
        assert "NaN" not in out
        assert render(report, key) == out


def test_cli_formats_are_registered() -> None:
    from vqdoctor.cli.options import ReportFormat

    assert {f.value for f in ReportFormat} <= set(FORMATS)


def test_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown format 'xml'; known: text, json, markdown"):
        render(healthy_report(), "xml")


def test_formats_do_not_import_torch() -> None:
    pkg = Path(__file__).parents[1] / "vqdoctor" / "formats"
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path


# --- helpers ---------------------------------------------------------------------------------


def test_fmt_helpers() -> None:
    assert [fmt_pct(x) for x in (0, 0.0004, 0.004, 0.03, 0.996, 0.9996, 1)] == [
        "0%", "<0.1%", "0.4%", "3%", "99.6%", ">99.9%", "100%"]
    assert [fmt_num(x) for x in (1024, 1.9, 0.001, 9.12e5 + 0.5, 1.2e13, float("nan"), None)] == [
        "1024", "1.9", "0.001", "9.1e+05", "1.2e+13", "n/a", "n/a"]


def test_usage_shares_and_sparkline() -> None:
    shares = usage_shares([0, 3, 1, 0])
    assert shares == [0.75, 0.25, 0.0, 0.0]
    assert sparkline(shares) == "█▃··"
    assert usage_shares([0, 0]) == [] and usage_shares([]) == []
    assert len(usage_shares([1.0] * 100)) <= 32


def test_nesting_follows_caused_by() -> None:
    assert nesting(warning_report().findings) == [0, 1, 2, 0]
