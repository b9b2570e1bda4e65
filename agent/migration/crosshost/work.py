"""What a cross-host move has done so far (``CrossHostWork``): its plan, the step it took last, the
destination's answer to ``prepare``, the snapshot metadata it carries, the lower layers already sent. Its
JSON is the task's checkpoint (``checkpoint_data``); a restarted agent reads it back (``from_checkpoint``)
and resumes from it (``crosshost.resume``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.migration.engine import Step, TaskContext
from agent.migration.peer.wire import Prepared
from agent.migration.plan import MigrationPlan
from agent.migration.snapshots import SnapshotMeta

ENGINE = "cross-host"


@dataclass(kw_only=True)
class CrossHostWork:
    plan: MigrationPlan
    step: Step = Step.PREPARING
    #: The destination's answer to ``prepare`` (where each disk goes there, its libvirt): from PREPARED on.
    prepared: Prepared | None = None
    #: libvirt's snapshot metadata, parents first, journalled before the migration takes it off the source.
    snapshots: list[SnapshotMeta] = field(default_factory=list)
    #: Lower layers sent and verified there: destination path -> source path.
    layers_done: dict[str, str] = field(default_factory=dict)

    def checkpoint_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"engine": ENGINE, "step": self.step, "plan": self.plan.to_dict()}
        if self.prepared is not None:
            data["prepared"] = self.prepared.model_dump()
        if self.snapshots:
            data["snapshots"] = [m.to_dict() for m in self.snapshots]
        if self.layers_done:
            data["layersDone"] = dict(self.layers_done)
        return data

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any]) -> CrossHostWork:
        prepared = data.get("prepared")
        step = str(data.get("step"))
        return cls(
            plan=MigrationPlan.from_dict(data["plan"]),
            # A step this agent does not know (a newer one journalled it) resumes as the earliest: cleaned up.
            step=Step(step) if step in Step.__members__.values() else Step.PREPARING,
            prepared=None if prepared is None else Prepared.model_validate(prepared),
            snapshots=[SnapshotMeta.from_dict(d) for d in data.get("snapshots") or []],
            layers_done=dict(data.get("layersDone") or {}),
        )

    async def checkpoint(self, ctx: TaskContext, step: Step | None = None) -> None:
        """Journal the work (at ``step``, when given): the last checkpoint is where a restart resumes."""
        if step is not None:
            self.step = step
        await ctx.checkpoint(self.checkpoint_data())

    @property
    def destination(self) -> Prepared:
        """The destination's answer to ``prepare``; only asked for once the move is past PREPARED."""
        if self.prepared is None:
            raise RuntimeError(f"the cross-host move is at step {self.step}: nothing prepared yet")
        return self.prepared
