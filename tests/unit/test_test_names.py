"""Every test module's file name is unique across tests/ (pytest imports them by name: two test_x.py in
two folders fail the whole collection with "import file mismatch", which CI would meet first)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique() -> None:
    names = Counter(path.name for path in TESTS.rglob("*.py") if path.name != "conftest.py")
    assert [name for name, n in names.items() if n > 1] == []
