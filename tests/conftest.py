"""Shared test setup: make `labkit` (the lab's code, at the repository root, not installed) importable."""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
