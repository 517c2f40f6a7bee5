"""The repository's documents hold together: every ``METHOD §N`` the code cites is a section of docs/method.md,
and every relative Markdown link in README.md and docs/*.md points at a file (and heading) that exists.

Pure file reading, no model and no import of the package.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD_DOC = ROOT / "docs" / "method.md"
# Where citations may be: the package, its installed subpackages, configs, benchmarks, tests and the documents.
CITING_DIRS = ("slug_lightning", "callbacks", "datamodules", "configs", "benchmarks", "tests", "docs")
CITING_FILES = ("README.md",)
SUFFIXES = {".py", ".yaml", ".yml", ".md"}
LINKING_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# "METHOD §7", "METHOD §4.2", and ranges "METHOD §3–§4" / "METHOD §4-7" (every section of a range is cited).
SECTION = r"\d+(?:\.\d+)?"
CITATION = re.compile(rf"METHOD §({SECTION})(?:\s*[–-]\s*§?({SECTION}))?")
# "## §7 Choosing the result" is section 7; "### §4.2 ..." is section 4.2.
HEADING = re.compile(r"^(##|###)\s+§(\d+(?:\.\d+)?)(?=\s|$)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def citing_files() -> list[Path]:
    """Every file that may cite METHOD, this one left out (its examples are not citations)."""
    files = [ROOT / name for name in CITING_FILES]
    for directory in CITING_DIRS:
        files += [
            p
            for p in sorted((ROOT / directory).rglob("*"))
            if p.suffix in SUFFIXES and p.is_file() and "__pycache__" not in p.parts
        ]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def cited_sections(text: str) -> set[str]:
    """The sections a text cites; a range of whole sections cites every section in it."""
    sections = set()
    for first, last in CITATION.findall(text):
        sections.add(first)
        if last:
            sections.add(last)
            if "." not in first and "." not in last:
                sections.update(str(n) for n in range(int(first), int(last) + 1))
    return sections


def method_sections() -> list[str]:
    return [number for _, number in HEADING.findall(without_code_blocks(METHOD_DOC.read_text(encoding="utf-8")))]


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    result = set()
    for line in without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[str]:
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link (its text may look like one)
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def test_the_scan_finds_the_citations():
    """Guards the other tests: a broken pattern or path list would find nothing and pass."""
    files = citing_files()
    assert ROOT / "slug_lightning" / "search.py" in files and ROOT / "configs" / "demo" / "unlearn.yaml" in files
    assert cited_sections("see METHOD §3–§4 and METHOD §7.") == {"3", "4", "7"}
    assert cited_sections("METHOD §4-§7") == {"4", "5", "6", "7"}
    assert cited_sections("METHOD §4.2") == {"4.2"}
    count = sum(len(CITATION.findall(p.read_text(encoding="utf-8", errors="replace"))) for p in files)
    assert count >= 50, f"only {count} METHOD citations found; the scan is broken"


def test_method_sections_are_unique():
    sections = method_sections()
    assert sections, f"{METHOD_DOC} has no '## §N' headings"
    assert len(sections) == len(set(sections)), f"sections numbered twice in {METHOD_DOC}: {sections}"


def test_every_cited_method_section_has_a_heading():
    sections = set(method_sections())
    missing = []
    for path in citing_files():
        for line, row in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            missing += [
                f"{path.relative_to(ROOT)}:{line}: METHOD §{number}"
                for number in sorted(cited_sections(row) - sections)
            ]
    assert not missing, "cited sections with no '## §N' (or '### §N.M') heading in docs/method.md:\n" + "\n".join(
        missing
    )


@pytest.mark.parametrize("document", LINKING_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path):
    broken = []
    for target in links(document):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif fragment and linked.suffix == ".md" and fragment.lower() not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{fragment} in {linked.relative_to(ROOT)}")
    assert not broken, f"broken links in {document.relative_to(ROOT)}:\n" + "\n".join(broken)
