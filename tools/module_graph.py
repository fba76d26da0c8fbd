"""The pack's modules and which of the pack's modules each one imports, as the Markdown table of
docs/design.md (tests/test_packaging_layout.py keeps the file equal to it).

    python tools/module_graph.py            # print the table
    python tools/module_graph.py --write    # rewrite it in docs/design.md
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
PACKAGES = ("nodes", "training")
START, END = "<!-- module-graph:start -->\n", "<!-- module-graph:end -->"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACK).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of nodes/ and training/ (packages included), by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((PACK / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The pack modules ``name`` imports (at any depth of its code: lazy imports count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and candidate not in PACKAGES:
                found.add(candidate)
    return found


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    # The first sentence: a full stop then a capital, not one of an abbreviation ("et al. 2023").
    sentence = re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`])", first)[0]
    return sentence.rstrip(".:").replace("|", "\\|")


def table() -> str:
    modules = project_modules()
    known = set(modules)
    lines = ["| module | what it holds | imports (pack modules) |", "|---|---|---|"]
    for name, path in modules.items():
        if name in PACKAGES:
            continue
        deps = sorted(imports_of(name, path, known))
        short = ", ".join(f"`{d}`" for d in deps) or "-"
        lines.append(f"| `{name}` | {summary(path)} | {short} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        design = PACK / "docs" / "design.md"
        text = design.read_text(encoding="utf-8")
        head, rest = text.split(START)
        _, tail = rest.split(END)
        design.write_text(head + START + table() + END + tail, encoding="utf-8")
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
