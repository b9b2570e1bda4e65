"""Cross-host live migration with storage (``engine`` tells the steps and names the file of each)."""

from agent.migration.crosshost.engine import CrossHostEngine
from agent.migration.crosshost.params import first_mirror_speed

__all__ = ["CrossHostEngine", "first_mirror_speed"]
