"""JUnit XML gate format, for the test reporters of GitHub, GitLab and Jenkins.

    <testsuites name="vqdoctor gate" tests= failures= errors= skipped= time="0">
      <testsuite name="vqdoctor gate: TARGET" ...>
        <properties>...</properties>
        <testcase classname="vqdoctor.QUANTIZER" name="CHECK" time="0">
          <failure message="ONE LINE" type="CHECK">measured, threshold, top finding, fix</failure>
          | <skipped message="REASON"/>
        </testcase>
        ...

One testcase per quantizer x check (run-wide checks under `vqdoctor.run`); an incomplete
analysis adds a `vqdoctor.run` / `analysis` testcase with an `<error>`. Built with ElementTree,
so text and attributes are escaped; characters XML 1.0 cannot hold are dropped.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from vqdoctor.formats.base import Format
from vqdoctor.formats.gate_parts import finding_line, measured, target_line, threshold
from vqdoctor.gate import Check, GateResult, Status
from vqdoctor.numbers import one_line

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """`text` without the characters XML 1.0 cannot represent (escaping is ElementTree's job)."""
    return _INVALID_XML.sub("", str(text))


def failure_text(c: Check) -> str:
    """The body of a `<failure>`: measured value, threshold, source, and the top finding."""
    lines = [f"measured: {measured(c)}" + (f" ({c.detail})" if c.detail else ""),
             f"threshold: {threshold(c)}", f"check: {one_line(c.message)}"]
    if c.finding is not None:
        lines.append(f"finding: {finding_line(c.finding)}")
        if c.finding.caused_by:
            lines.append(f"caused by: {c.finding.caused_by}")
        if c.finding.fix:
            lines.append(f"fix: {one_line(c.finding.fix)}")
    return "\n".join(lines)


def failure_message(c: Check) -> str:
    """The `message` attribute: the check's line, then the finding's id and code."""
    msg = one_line(c.message) + (f" [{c.detail}]" if c.detail else "")
    if c.finding is not None and c.name != "findings":
        msg += f" (finding: {c.finding.code} {c.finding.id})"
    return msg


class JunitFormat(Format):
    """Gate result as JUnit XML (one testsuite for the target)."""

    name = "junit"
    suffix = ".xml"
    result = "gate"

    def render(self, result: GateResult) -> str:
        """Render `result` as a `<testsuites>` document."""
        cases = [self._case(c) for c in result.checks]
        errors = 0
        if result.outcome == "incomplete":
            case = ET.Element("testcase", classname="vqdoctor.run", name="analysis", time="0")
            text = "\n".join(result.problems)
            ET.SubElement(case, "error", message=xml_text(one_line(result.problems[0])),
                          type="incomplete").text = xml_text(text)
            cases.append(case)
            errors = 1
        counts = {"tests": str(len(cases)), "failures": str(result.count(Status.FAIL)),
                  "errors": str(errors), "skipped": str(result.count(Status.SKIP)), "time": "0"}
        root = ET.Element("testsuites", name="vqdoctor gate", **counts)
        suite = ET.SubElement(root, "testsuite", name=xml_text(f"vqdoctor gate: {result.target}"),
                              **counts)
        props = ET.SubElement(suite, "properties")
        d = result.diagnosis
        for key, value in (("target", target_line(result)), ("source_kind", result.kind),
                           ("outcome", result.outcome), ("verdict", result.report.verdict),
                           ("diagnosis", f"{d.code} {d.id}" if d else ""),
                           ("exit_code", "" if result.exit_code is None else str(result.exit_code))):
            if value:
                ET.SubElement(props, "property", name=key, value=xml_text(value))
        suite.extend(cases)
        ET.SubElement(suite, "system-out").text = xml_text(
            "\n".join([result.summary_line(), *result.notes]))
        ET.indent(root, space="  ")
        body = ET.tostring(root, encoding="unicode")
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"

    def render_error(self, message: str) -> str:
        """A document with one `vqdoctor.run` / `analysis` testcase holding an `<error>`."""
        counts = {"tests": "1", "failures": "0", "errors": "1", "skipped": "0", "time": "0"}
        root = ET.Element("testsuites", name="vqdoctor gate", **counts)
        suite = ET.SubElement(root, "testsuite", name="vqdoctor gate", **counts)
        case = ET.SubElement(suite, "testcase", classname="vqdoctor.run", name="analysis", time="0")
        ET.SubElement(case, "error", message=xml_text(one_line(message)),
                      type="could-not-analyse").text = xml_text(message)
        ET.indent(root, space="  ")
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"

    def _case(self, c: Check) -> ET.Element:
        case = ET.Element("testcase", classname=xml_text(f"vqdoctor.{c.subject}"), name=c.name,
                          time="0")
        if c.status is Status.FAIL:
            ET.SubElement(case, "failure", message=xml_text(failure_message(c)),
                          type=c.name).text = xml_text(failure_text(c))
        elif c.status is Status.SKIP:
            ET.SubElement(case, "skipped", message=xml_text(one_line(c.message)))
        return case
