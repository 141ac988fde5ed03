"""Gate formats: JUnit XML parsed back, GitHub workflow commands line by line, text, markdown, JSON.

Real results come from the CI example's checkpoints (fixtures of test_gate); a hand-built result
with 12 failing quantizers and hostile text checks the caps and the escaping.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_gate import smoke, trained  # noqa: F401  (fixtures)

from vqdoctor.formats import GATE_FORMATS
from vqdoctor.formats import format as render
from vqdoctor.formats.github import MAX_PER_LEVEL, escape_data, escape_property
from vqdoctor.gate import Check, GateResult, GateThresholds, Status, gate
from vqdoctor.results.model import QuantizerReport, Report
from vqdoctor.rules.base import Finding

HOSTILE = "50% of codes\r\nnext line: a, b & <c> \x01"
CHECKS = {"min_perplexity", "min_usage", "max_dead_fraction", "findings", "training", "analysis"}


def finding(i: int, severity: str = "error", quantizer: str | None = None) -> Finding:
    return Finding(id="dead-codes", code="VQ005", severity=severity, confidence=0.9,
                   quantizer=quantizer, step=None, message=f"{i}: {HOSTILE}",
                   evidence={"dead_fraction": 0.9}, fix="replace dead codes, 100% of them")


@pytest.fixture
def many() -> GateResult:
    """A run with a failed training, 12 quantizers failing min_usage, 12 warnings, 12 skips."""
    names = [f"rvq.layers.{i}" for i in range(12)]
    findings = [finding(i, "warning", n) for i, n in enumerate(names)]
    report = Report(source={"kind": "run", "paths": ["runs/x"], "status": "failed"},
                    quantizers=[QuantizerReport(info={"name": n, "codebook_size": 1024},
                                                metrics={}) for n in names],
                    findings=findings, tool_version="0.1.0")
    checks = []
    for n in names:
        checks.append(Check(n, "min_usage", Status.FAIL, f"codes used 1% < 25% ({HOSTILE})",
                            metric="usage_window", source="run, last 100 steps", value=0.01,
                            threshold=0.25, threshold_spec="25%"))
        checks.append(Check(n, "max_dead_fraction", Status.SKIP, f"not measurable: {HOSTILE}"))
    checks.append(Check(None, "training", Status.FAIL, "the training failed: exit code 3",
                        metric="exit_code", value=3.0, threshold=0.0))
    return GateResult(target="python train.py", kind="run",
                      thresholds=GateThresholds(fail_on="error"), checks=tuple(checks),
                      report=report, command=("python", "train.py"), exit_code=3)


@pytest.fixture
def collapsed(trained: dict[str, Path]) -> GateResult:  # noqa: F811
    d = trained["collapsed"]
    # every threshold check on (the usage floors are opt-in), so each format shows four failures
    return gate(d / "checkpoint.pt", GateThresholds(min_usage=0.25, max_dead_fraction=0.5), probe=d / "probe.pt")


# --- JUnit -------------------------------------------------------------------------------------


def check_junit(text: str) -> ET.Element:
    """Parse and validate the JUnit structure; return the root."""
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n')
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    for el in (root, suites[0]):
        cases = suites[0].findall("testcase")
        assert int(el.get("tests")) == len(cases)
        assert int(el.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert int(el.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
        assert int(el.get("errors")) == sum(c.find("error") is not None for c in cases)
    for case in suites[0].findall("testcase"):
        assert case.get("classname", "").startswith("vqdoctor.")
        assert case.get("name") in CHECKS
        assert len([c for c in case if c.tag in ("failure", "skipped", "error")]) <= 1
        failure = case.find("failure")
        if failure is not None:
            assert failure.get("message") and failure.get("type") == case.get("name")
            assert "measured: " in failure.text and "threshold: " in failure.text
        skipped = case.find("skipped")
        if skipped is not None:
            assert skipped.get("message")
    return root


def test_junit_real_collapse(collapsed: GateResult) -> None:
    root = check_junit(render(collapsed, "junit"))
    suite = root.find("testsuite")
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("4", "4", "0")
    case = suite.find("testcase[@name='min_perplexity']")
    assert case.get("classname") == "vqdoctor.quantizer"
    body = case.find("failure").text
    c = next(c for c in collapsed.checks if c.name == "min_perplexity")
    assert f"measured: {c.value:.3g}" in body or "measured: 1 " in body
    assert "threshold: >= 2 (1% (at least 2))" in body and "probe_perplexity" in body
    d = c.finding
    assert f"finding: {d.code} {d.id} [{d.severity}]" in body and f"fix: {d.fix[:30]}" in body
    assert d.id in case.find("failure").get("message")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["outcome"] == "fail" and props["diagnosis"].endswith(collapsed.diagnosis.id)


def test_junit_counts_skips_and_hostile_text(many: GateResult) -> None:
    text = render(many, "junit")
    root = check_junit(text)
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("25", "13", "12")
    assert "\x01" not in text                                     # not representable in XML 1.0
    msg = root.find("testsuite/testcase/failure").get("message")
    assert "50% of codes" in msg and "<c>" in msg                 # escaped, and read back whole


def test_junit_parses_in_junitparser(collapsed: GateResult, many: GateResult,
                                     tmp_path: Path) -> None:
    junitparser = pytest.importorskip("junitparser")
    for i, result in enumerate((collapsed, many)):
        path = tmp_path / f"{i}.xml"
        path.write_text(render(result, "junit"), encoding="utf-8")
        xml = junitparser.JUnitXml.fromfile(str(path))
        suites = list(xml)
        assert len(suites) == 1
        cases = list(suites[0])
        assert len(cases) == len(result.checks)
        failed = [c for c in cases if c.result and isinstance(c.result[0], junitparser.Failure)]
        assert len(failed) == result.count(Status.FAIL)


# --- GitHub ------------------------------------------------------------------------------------

COMMAND = re.compile(r"^::(error|warning|notice) title=([^:,\r\n]*)::([^\r\n]*)$")


def unescape(text: str) -> str:
    return (text.replace("%0A", "\n").replace("%0D", "\r").replace("%3A", ":")
            .replace("%2C", ",").replace("%25", "%"))


def commands(text: str) -> list[tuple[str, str, str]]:
    lines = text.splitlines()
    assert text.endswith("\n") and lines[-1].startswith("gate ")     # the summary line last
    out = []
    for line in lines[:-1]:
        m = COMMAND.match(line)
        assert m, line
        level, title, message = m.groups()
        for part in (title, message):                    # every % starts an escape
            assert re.fullmatch(r"([^%]|%25|%0D|%0A|%3A|%2C)*", part), part
        out.append((level, unescape(title), unescape(message)))
    return out


def test_escaping_round_trips() -> None:
    assert escape_data("100%\r\n:,") == "100%25%0D%0A:,"
    assert escape_property("a: b, 5%\n") == "a%3A b%2C 5%25%0A"
    assert unescape(escape_property(HOSTILE)) == HOSTILE


def test_github_real_collapse(collapsed: GateResult) -> None:
    cmds = commands(render(collapsed, "github"))
    errors = [c for c in cmds if c[0] == "error"]
    assert len(errors) == 4
    level, title, message = errors[0]
    assert title == "vqdoctor gate: quantizer min_perplexity"
    first, *rest = message.split("\n")
    assert first.startswith("perplexity 1") and "1% of 64 codes, at least 2" in first
    d = collapsed.failures[0].finding
    assert f"{d.code} {d.id}" in rest[0] and rest[-1].startswith("fix: ")


def test_github_caps_ranks_and_escapes(many: GateResult) -> None:
    cmds = commands(render(many, "github"))
    by_level = {lvl: [c for c in cmds if c[0] == lvl] for lvl in ("error", "warning", "notice")}
    assert all(len(v) == MAX_PER_LEVEL for v in by_level.values())
    errors = by_level["error"]
    assert errors[0][1] == "vqdoctor gate: run training"           # the training's failure first
    assert "exit code 3" in errors[0][2]
    assert errors[-1][2].startswith("4 more failed checks")         # 13 failures: 9 shown + 1
    assert by_level["warning"][-1][2].startswith("3 more findings")
    assert by_level["notice"][-1][2].startswith("3 more skipped checks")
    # messages are single lines joined by LF (escaped); '%' ':' ',' '<' '&' read back intact
    assert "(50% of codes next line: a, b & <c>" in errors[1][2]
    assert "\nfix: " not in errors[1][2] and "\nVQ005" not in errors[1][2]   # no finding cited
    assert "%0Afix: replace dead codes, 100%25 of them" in render(many, "github")
    assert "title=vqdoctor gate%3A rvq.layers.0 min_usage::" in render(many, "github")


def test_github_error_document() -> None:
    doc = GATE_FORMATS["github"]().render_error("a.pt: 100% broken\nreally")
    assert doc == "::error title=vqdoctor gate%3A could not analyse::a.pt: 100%25 broken%0Areally\n"


# --- text, markdown, json ----------------------------------------------------------------------


def test_text_fits_80_columns(collapsed: GateResult, many: GateResult) -> None:
    for result in (collapsed, many):
        text = render(result, "text")
        assert all(len(line) <= 80 for line in text.splitlines()), text
    text = render(collapsed, "text")
    assert "FAIL min_perplexity" in text and "probe_perplexity, probe, 2048 tokens" in text
    assert f"diagnosis: {collapsed.diagnosis.code} {collapsed.diagnosis.id}" in text
    assert text.rstrip().endswith(collapsed.summary_line())


def test_markdown_table_and_findings(collapsed: GateResult, many: GateResult) -> None:
    md = render(collapsed, "markdown")
    assert md.startswith("## ❌ vqdoctor gate failed\n")
    rows = [line for line in md.splitlines() if line.startswith("| ❌") or line.startswith("| ✅")]
    assert len(rows) == len(collapsed.checks)
    assert "### Top findings" in md and collapsed.diagnosis.id in md
    md_many = render(many, "markdown")
    assert md_many.count("| ⏭️ skip |") == 12 and "\r" not in md_many


def test_json_embeds_the_report(collapsed: GateResult) -> None:
    doc = json.loads(render(collapsed, "json"))
    assert doc["schema_version"] == 1 and doc["kind"] == "gate"
    assert doc["outcome"] == "fail" and doc["passed"] is False
    assert doc["counts"] == {"pass": 0, "fail": 4, "skip": 0}
    assert doc["report"] == json.loads(json.dumps(collapsed.report.to_dict()))
    first = doc["failures"][0]
    assert first["check"] == "min_perplexity" and first["metric"] == "probe_perplexity"
    assert first["threshold_spec"] == "1% (at least 2)" and first["finding"]["id"] == collapsed.diagnosis.id
