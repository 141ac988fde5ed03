"""`vqdoctor rules [ID_OR_CODE]`: list the failure modes, or explain one (like `ruff rule`)."""

from __future__ import annotations

import difflib
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markdown import Markdown
from rich.table import Table

from vqdoctor.cli.boundary import boundary
from vqdoctor.cli.options import FormatOption, ReportFormat
from vqdoctor.cli.output import out_console, print_block, write_report
from vqdoctor.errors import InputError
from vqdoctor.rules.base import json_value

if TYPE_CHECKING:
    from vqdoctor.rules.base import Rule


def find_rule(key: str, rules: dict[str, Rule]) -> Rule:
    """The rule named by id or code (codes case-insensitive).

    Raises:
        InputError: no such rule; the message lists the known ids.
    """
    if key in rules:
        return rules[key]
    for r in rules.values():
        if r.spec.code.lower() == key.lower():
            return r
    close = difflib.get_close_matches(key, list(rules), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InputError(f"unknown rule {key!r}; {hint}known: {', '.join(rules) or 'none'}")


def rule_dict(r: Rule, *, doc: bool) -> dict[str, Any]:
    """JSON-native description of a rule."""
    out: dict[str, Any] = {"code": r.spec.code, "id": r.spec.id, "title": r.spec.title,
                           "explains": list(r.spec.explains),
                           "thresholds": json_value(r.thresholds())}
    if doc:
        out["doc"] = r.spec.doc
    return out


def _default(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (bool, str, type(None))) else repr(v)


def rule_page(r: Rule) -> str:
    """A rule's documentation page as markdown: title, doc, what it explains, thresholds."""
    s = r.spec
    parts = [f"# {s.code} {s.id}", "", s.title, "", s.doc.strip(), ""]
    if s.explains:
        parts += ["## Can cause", "", ", ".join(f"`{x}`" for x in s.explains), ""]
    thresholds = r.thresholds()
    parts += ["## Default thresholds", ""]
    if thresholds:
        parts += [f"- `{name}` = `{_default(v)}`" for name, v in thresholds.items()]
        parts += ["", f"Override with `--threshold {s.id}.NAME=VALUE` or in pyproject.toml "
                      f"under `[tool.vqdoctor.thresholds.{s.id}]`."]
    else:
        parts.append("None.")
    return "\n".join(parts).rstrip() + "\n"


def rules_markdown(rules: dict[str, Rule]) -> str:
    """The rule list as a markdown table."""
    lines = ["| code | id | title |", "|---|---|---|"]
    lines += [f"| {r.spec.code} | `{r.spec.id}` | {r.spec.title.replace('|', chr(92) + '|')} |"
              for r in rules.values()]
    return "\n".join(lines) + "\n"


@boundary
def rules(
    rule: Annotated[str | None, typer.Argument(
        metavar="[ID_OR_CODE]", show_default=False,
        help="A rule id or code, e.g. scale-mismatch or VQ003.")] = None,
    fmt: FormatOption = ReportFormat.text,
) -> None:
    """List the failure modes vqdoctor diagnoses, or explain one (what, why, signals, fixes)."""
    from vqdoctor.rules import registry

    reg = registry()
    out = out_console()
    if rule is None:
        if fmt is ReportFormat.json:
            write_report(json.dumps([rule_dict(r, doc=False) for r in reg.values()],
                                    indent=2) + "\n", None)
        elif fmt is ReportFormat.markdown:
            write_report(rules_markdown(reg), None)
        else:
            table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
            table.add_column("code", no_wrap=True)
            table.add_column("id", no_wrap=True, style="cyan")
            table.add_column("title")
            for r in reg.values():
                table.add_row(r.spec.code, r.spec.id, r.spec.title)
            print_block(out, table)
            out.print("\nExplain one: vqdoctor rules ID_OR_CODE", style="dim")
        return
    r = find_rule(rule, reg)
    if fmt is ReportFormat.json:
        write_report(json.dumps(rule_dict(r, doc=True), indent=2) + "\n", None)
    elif fmt is ReportFormat.text and out.is_terminal:
        out.print(Markdown(rule_page(r)), soft_wrap=False)
    else:
        write_report(rule_page(r), None)


__all__ = ["find_rule", "rule_dict", "rule_page", "rules", "rules_markdown"]
