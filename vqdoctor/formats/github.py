"""GitHub Actions gate format: workflow commands that become annotations on the run.

    ::error title=vqdoctor gate%3A quantizer min_perplexity::perplexity 1 < 3.2 ...%0AVQ005 ...
    ::warning title=vqdoctor%3A VQ003 scale-mismatch::...
    ::notice title=vqdoctor gate%3A vq.layers.1 min_usage::not measurable: ...
    gate failed: 4 of 6 checks failed (diagnosis: dead-codes)

`::error` lines are the failed checks (ranked: a failed training first, then by the rank of
the finding behind them, which each one cites with its fix) and the reasons an analysis is
incomplete; `::warning` lines the findings that did not gate (below `--fail-on`) and are not
cited by a failure; `::notice` lines the skipped checks. GitHub shows
at most 10 annotations of each level per step, so each level stops at 10, the last one saying
how many more there are. Data is escaped (`%`, CR, LF), and so are properties (also `:` and
`,`). The markdown summary for `$GITHUB_STEP_SUMMARY` is the `markdown` format; the CLI appends
it.
"""

from __future__ import annotations

from vqdoctor.formats.base import Format
from vqdoctor.formats.gate_parts import finding_line, gate_warnings
from vqdoctor.gate import Check, GateResult
from vqdoctor.numbers import one_line
from vqdoctor.rules.base import Finding

MAX_PER_LEVEL = 10
"""GitHub keeps at most 10 error, 10 warning and 10 notice annotations per step."""


def escape_data(text: str) -> str:
    """Escape a workflow command's message: `%` -> %25, CR -> %0D, LF -> %0A."""
    return str(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command property value: as data, and `:` -> %3A, `,` -> %2C."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(level: str, title: str, message: str) -> str:
    """One workflow command line: `::level title=...::message`, escaped."""
    return f"::{level} title={escape_property(title)}::{escape_data(message)}"


def _check_message(c: Check) -> str:
    lines = [one_line(c.message) + (f" [{c.detail}]" if c.detail else "")]
    f = c.finding
    if f is not None:
        if c.name != "findings":
            lines.append(finding_line(f))
        if f.fix:
            lines.append(f"fix: {one_line(f.fix)}")
    return "\n".join(lines)


def _finding_message(f: Finding) -> str:
    lines = [finding_line(f)]
    if f.fix:
        lines.append(f"fix: {one_line(f.fix)}")
    return "\n".join(lines)


def capped(level: str, items: list[tuple[str, str]], what: str) -> list[str]:
    """At most `MAX_PER_LEVEL` commands; past that the last one counts the rest."""
    if len(items) > MAX_PER_LEVEL:
        rest = len(items) - (MAX_PER_LEVEL - 1)
        items = items[: MAX_PER_LEVEL - 1] + [
            ("vqdoctor gate", f"{rest} more {what} (see the job summary or --format text)")]
    return [command(level, t, m) for t, m in items]


class GithubFormat(Format):
    """Gate result as GitHub Actions workflow commands, then the summary line."""

    name = "github"
    suffix = ".txt"
    result = "gate"

    def render(self, result: GateResult) -> str:
        """Render `result` as `::error` / `::warning` / `::notice` lines and the summary line."""
        errors = [(f"vqdoctor gate: {c.subject} {c.name}", _check_message(c))
                  for c in result.failures]
        if result.outcome == "incomplete":
            errors += [("vqdoctor gate: could not analyse", p) for p in result.problems]
        cited = {id(c.finding) for c in result.failures if c.finding is not None}
        warnings = [(f"vqdoctor: {f.code} {f.id}", _finding_message(f))
                    for f in gate_warnings(result) if id(f) not in cited]
        notices = [(f"vqdoctor gate: {c.subject} {c.name}", f"skipped: {one_line(c.message)}")
                   for c in result.skipped]
        lines = (capped("error", errors, "failed checks") + capped("warning", warnings, "findings")
                 + capped("notice", notices, "skipped checks"))
        lines.append(result.summary_line())
        return "\n".join(lines) + "\n"

    def render_error(self, message: str) -> str:
        """One `::error` line: the gate could not analyse."""
        return command("error", "vqdoctor gate: could not analyse", message) + "\n"
