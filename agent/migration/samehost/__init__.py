"""Same-host live storage migration (``engine`` tells the steps and names the file of each)."""

from agent.migration.samehost.engine import SameHostEngine

__all__ = ["SameHostEngine"]
