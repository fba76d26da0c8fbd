"""The docs stay true: every relative link resolves (file and heading), every document the code
cites exists, and docs/design.md's module table is the code's imports."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
DOCUMENTS = [PACK / "README.md", PACK / "bench" / "README.md", *sorted((PACK / "docs").glob("*.md"))]
CODE_FOLDERS = ("training", "nodes", "tools", "bench", "web")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(document: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(PACK)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        if not path.exists():
            broken.append(f"{target} (no file {path_part})")
        elif anchor and path.suffix == ".md" and anchor not in anchors_of(path):
            broken.append(f"{target} (no heading #{anchor} in {path.name})")
    assert not broken, f"{document.relative_to(PACK)} has broken links: {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    document = tmp_path / "a.md"
    document.write_text("# Top\n[ok](#top) [gone](missing.md) [bad](#nowhere)\n", encoding="utf-8")
    assert relative_links(document) == ["#top", "missing.md", "#nowhere"]
    assert anchors_of(document) == {"top"}
    assert github_anchor("Trainer memory (`trainer_memory.py`, CPU-2)") == "trainer-memory-trainer_memorypy-cpu-2"


def cited_documents() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for folder in CODE_FOLDERS:
        for source in sorted((PACK / folder).rglob("*")):
            if source.suffix not in (".py", ".js") or "node_modules" in source.parts:
                continue
            for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
                for name in CITATION.findall(line):
                    cited.setdefault(name, []).append(f"{source.relative_to(PACK)}:{number}")
    return cited


def test_every_document_the_code_cites_exists():
    """A citation is a repository path (docs/memory.md) or a bare name found in docs/ or the root."""
    missing = {}
    for name, places in cited_documents().items():
        candidates = [PACK / name, PACK / "docs" / Path(name).name]
        if not any(path.is_file() for path in candidates):
            missing[name] = places
    assert not missing, f"the code cites documents that are not in the repository: {missing}"


def test_design_module_table_is_the_code():
    spec = importlib.util.spec_from_file_location("module_graph", PACK / "tools" / "module_graph.py")
    module_graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module_graph)
    design = (PACK / "docs" / "design.md").read_text(encoding="utf-8")
    start, end = "<!-- module-graph:start -->", "<!-- module-graph:end -->"
    assert start in design and end in design, "docs/design.md lost its module table's markers"
    table = design.split(start)[1].split(end)[0].strip()
    assert table == module_graph.table().strip(), (
        "docs/design.md's module table differs from the code's imports: run python tools/module_graph.py --write")
