"""Documents the code cites exist, with the sections it cites; the contract's table is the registry's.

Comments, docstrings and pages cite `docs/<page>.md#<anchor>` (and other pages of the
repository). Every such reference must name a file that exists and, with an anchor, a heading of
that file under GitHub's slug rules, so a renamed section or a page that was never written fails
here instead of leaving readers with a dead reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vqdoctor.rules import registry

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("vqdoctor", "tests", "benchmarks", "examples", "docs")
SKIP_DIRS = {"__pycache__", ".venv", ".matrix", "_data", "golden"}

# A repository path cited in prose or code: `docs/contract.md#exit-codes`, `benchmarks/README.md`.
# Not after a word character, `/` or `.`, so `../docs/x.md` is left to the link pattern below.
BARE = re.compile(r"(?<![\w/.])((?:docs|benchmarks|examples|tests)/[\w./-]*?\.md)(#[\w-]+)?")
# A markdown link to another page (relative to the linking file) or to a section of the same one.
LINK = re.compile(r"\]\(([^)\s#]*\.md)?(#[^)\s]+)?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
TABLE_ROW = re.compile(r"^\|\s*(VQ\d{3})\s*\|\s*`([a-z-]+)`\s*\|", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text (fenced code skipped; repeats get -1, -2, ...)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def references(path: Path, text: str) -> list[tuple[Path, str | None, str]]:
    """(target file, anchor or None, as written) of every page reference in one file."""
    refs = [(ROOT / m.group(1), m.group(2), m.group(0)) for m in BARE.finditer(text)]
    if path.suffix == ".md":
        for m in LINK.finditer(text):
            target = (path.parent / m.group(1)).resolve() if m.group(1) else path
            if m.group(1) and "://" in m.group(1):
                continue
            refs.append((target, m.group(2), m.group(0)))
    return refs


def broken(path: Path, text: str) -> list[str]:
    """The references of one file that name a missing page or a heading the page does not have."""
    out = []
    for target, anchor, written in references(path, text):
        if not target.is_file():
            out.append(f"{written}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and anchor[1:] not in anchors(target.read_text(encoding="utf-8")):
            out.append(f"{written}: no heading #{anchor[1:]} in {target.relative_to(ROOT)}")
    return out


def scanned_files() -> list[Path]:
    """README.md and the .py / .md files under SCANNED, this file left out (it holds examples)."""
    files = [ROOT / "README.md"]
    for top in SCANNED:
        for p in sorted((ROOT / top).rglob("*")):
            if (p.suffix in (".py", ".md") and p.is_file() and p != Path(__file__).resolve()
                    and not SKIP_DIRS & set(p.relative_to(ROOT).parts)):
                files.append(p)
    return files


def test_slugs_follow_github():
    assert slug("The HTML report and `--plot`") == "the-html-report-and---plot"
    assert slug("vector-quantize-pytorch releases") == "vector-quantize-pytorch-releases"
    assert slug("torch.compile") == "torchcompile"
    assert slug("Exit codes") == "exit-codes"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### B: c\n") == {"a", "a-1", "b-c"}


def test_the_checker_finds_a_dead_reference(tmp_path):
    page = ROOT / "docs" / "contract.md"
    text = "see docs/contract.md#exit-codes and docs/contract.md#no-such-section and docs/nope.md"
    problems = broken(page, text)
    assert len(problems) == 2
    assert "no heading #no-such-section" in problems[0] and "no file docs/nope.md" in problems[1]


def test_every_cited_page_and_section_exists():
    problems = []
    cited = 0
    for f in scanned_files():
        text = f.read_text(encoding="utf-8")
        cited += len(references(f, text))
        problems += [f"{f.relative_to(ROOT)}: {p}" for p in broken(f, text)]
    assert cited > 50  # the scan sees the citations (a broken pattern would pass vacuously)
    assert not problems, "\n".join(problems)


def test_no_citation_of_documents_outside_the_repository():
    # The product contract and the research notes behind it live in docs/ now; nothing may cite
    # the originals (SPEC.md, the research note's numbered sections), which are not in the repo.
    stale = re.compile(r"SPEC\.md|SPEC's|SPEC story|the SPEC\b|research note|§|reference/[\w-]+\.md")
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
            for f in scanned_files()
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if stale.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", ["docs/contract.md", "README.md"])
def test_failure_mode_tables_match_the_registry(page):
    rows = TABLE_ROW.findall((ROOT / page).read_text(encoding="utf-8"))
    assert dict(rows) == {r.spec.code: rid for rid, r in registry().items()}
