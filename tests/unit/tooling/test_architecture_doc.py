"""docs/architecture.md names files, packages and methods: each must exist where the doc puts it.

- The diagram: each box starts with its package (``  api/``, ``  migration/``; the first line holds two);
  every ``name.py`` and ``name/`` in the box must be found under that package (``base:``: agent/ itself).
- The prose: every path in backquotes (``migration/runner.py``, ``tests/lab/test_x.py``) exists below
  agent/ or the repository; every ``Class.method`` names a class that defines that method; every
  ``_private`` name is defined somewhere in agent/.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.errors import Code

REPO = Path(__file__).resolve().parents[3]
AGENT = REPO / "agent"
DOC = REPO / "docs" / "architecture.md"

BOX = re.compile(r"^  (?:(\w+)/|base:)")
PACKAGE = re.compile(r"(?<![\w/.])(\w+)/(?!\w)")
MODULE = re.compile(r"(?<![\w/.])(\w+\.py)\b")
QUOTED = re.compile(r"`([^`\s]+)`")


def _diagram() -> list[str]:
    text = DOC.read_text()
    start = text.index("```\n") + 4
    return text[start : text.index("```", start)].splitlines()


def _boxes() -> list[tuple[list[Path], str]]:
    """(the packages a box may name, its text), in the diagram's order."""
    boxes: list[tuple[list[Path], str]] = []
    for line in _diagram():
        header = BOX.match(line)
        if header:  # its packages (the first line holds two boxes side by side), not what it says of them
            names = PACKAGE.findall(re.sub(r"\([^)]*\)", "", line)) if header.group(1) else []
            boxes.append(([AGENT / n for n in names] or [AGENT], ""))
        if boxes:
            boxes[-1] = (boxes[-1][0], boxes[-1][1] + line + "\n")
    return boxes


def _found_under(packages: list[Path], name: str, *, directory: bool) -> bool:
    for package in packages:
        # The base line names modules of agent/ itself; a box, files anywhere in its package.
        candidates = [AGENT / name] if package == AGENT else [package / name, *package.rglob(name)]
        if any(c.is_dir() if directory else c.is_file() for c in candidates):
            return True
    return False


def test_the_diagram_names_only_files_that_are_in_their_package() -> None:
    boxes = _boxes()
    assert len(boxes) >= 10, boxes
    missing = [
        f"{name} (in the box of {', '.join(p.name for p in packages)})"
        for packages, text in boxes
        for name in MODULE.findall(text)
        if not _found_under(packages, name, directory=False)
    ] + [
        f"{name}/ (in the box of {', '.join(p.name for p in packages)})"
        for packages, text in boxes
        for name in PACKAGE.findall(text)
        if not _found_under(packages, name, directory=True) and not (AGENT / name).is_dir()
    ]
    assert missing == []


def _quoted() -> list[str]:
    text = DOC.read_text()
    prose = text[text.index("```", text.index("```\n") + 4) + 3 :]
    return QUOTED.findall(prose)


def test_the_prose_names_paths_that_exist() -> None:
    paths = [q for q in _quoted() if "/" in q and not q.startswith(("/", "GET", "POST")) and "{" not in q]
    assert paths
    below_agent = {str(p.relative_to(AGENT)) for p in AGENT.rglob("*") if "__pycache__" not in str(p)}
    missing = [
        p
        for p in paths
        if not (REPO / p).exists()  # from the repository's root, or below agent/, maybe from a package down
        and not any(name == p.rstrip("/") or name.endswith("/" + p.rstrip("/")) for name in below_agent)
    ]
    assert missing == []


def test_the_prose_names_methods_and_functions_that_exist() -> None:
    sources = {path: path.read_text() for path in AGENT.rglob("*.py")}
    methods = [q for q in _quoted() if re.fullmatch(r"[A-Z]\w+\.\w+", q) and not q.startswith("AGENT.")]
    privates = [q for q in _quoted() if re.fullmatch(r"_\w+", q)]
    assert methods
    missing = [
        q
        for q in methods
        if not any(
            re.search(rf"^class {q.split('.')[0]}\b", text, re.M)
            and re.search(rf"^    (?:async )?def {q.split('.')[1]}\b", text, re.M)
            for text in sources.values()
        )
    ] + [q for q in privates if not any(re.search(rf"def {q}\b", text) for text in sources.values())]
    assert missing == []


def test_the_prose_names_registered_codes() -> None:
    codes = [q for q in _quoted() if q.startswith("AGENT.")]
    assert codes
    assert [q for q in codes if Code.known(q) is None] == []
