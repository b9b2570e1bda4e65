"""The first step of the file and block kinds' confinement: a location from the network, taken in the
storage's directory when relative, refused unless the kind's own rule (``contains``) accepts it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.errors import PathOutsideRoot


def confined(
    directory: Path, location: str | Path, contains: Callable[[Path], bool], refusal: PathOutsideRoot
) -> Path:
    """``location`` (a relative one taken in ``directory``), or ``refusal`` raised unless ``contains`` it."""
    candidate = Path(location)
    if not candidate.is_absolute():
        candidate = directory / candidate
    if not contains(candidate):
        raise refusal
    return candidate
