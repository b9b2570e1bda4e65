"""Task states live with the engine contract (``agent.migration.states``): engines announce them and the
skeleton ends tasks in them. Re-exported here for the task engine's own modules."""

from agent.migration.states import TaskState, can_transition

__all__ = ["TaskState", "can_transition"]
