"""What a same-host task has done so far (journalled at every step), and each of its mirrors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.migration.engine import Step, TaskContext
from agent.migration.mirrors.hotdisk import BudgetMeter, DiskWatch, Mode
from agent.migration.mirrors.pacer import PacedMirror
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.storage.roots import Storage
from agent.virt.domxml import VolumeSource


@dataclass(kw_only=True)
class Mirror(PacedMirror):
    """One disk's block copy: what the pacer keeps of it, and the disk it moves."""

    disk: DiskPlan
    ends_to_ignore: int = 0  # end events of mirrors this task aborted on purpose (restarts)

    @classmethod
    def of(cls, disk: DiskPlan, index: AllocationIndex, watch: DiskWatch | None = None) -> Mirror:
        """``watch``: a new one when None (a mirror picked up after a restart, or made for cleanup)."""
        if watch is None:
            watch = DiskWatch(disk.target)
        return cls(disk.target, index, disk.virtual_size, watch=watch, disk=disk)


@dataclass
class Work:
    """What this task has done so far: files it created and mirrors it started (for cleanup)."""

    plan: MigrationPlan
    #: The destination storage (from the configuration, by ``plan.dst_storage_uuid``).
    dst: Storage
    created: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    mirrors: dict[str, Mirror] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rates: list[dict[str, Any]] = field(default_factory=list)
    meter: BudgetMeter = field(default_factory=BudgetMeter)

    def checkpoint_data(self, step: Step) -> dict[str, Any]:
        return {
            "engine": "same-host",
            "step": step,
            "plan": self.plan.to_dict(),
            "created": self.created,
            "reused": self.reused,
            "mirroring": sorted(self.mirrors),
            "writeBlocking": sorted(t for t, m in self.mirrors.items() if m.mode is Mode.WRITE_BLOCKING),
        }

    def dst_source(self, disk: DiskPlan) -> VolumeSource:
        """Where ``disk`` goes, as libvirt names it."""
        return self.plan.dst_source(disk)

    @property
    def watches(self) -> dict[str, DiskWatch]:
        return {t: m.watch for t, m in self.mirrors.items() if m.watch is not None}

    @property
    def ready(self) -> set[str]:
        return {t for t, m in self.mirrors.items() if m.ready}

    def figures(self, shares: Mapping[str, int | None]) -> dict[str, Any]:
        return {t: w.figures(shares.get(t)) for t, w in self.watches.items()}

    def decide(self, ctx: TaskContext, message: str, **figures: Any) -> None:
        """A hot-disk decision: logged, and the last 20 in the task's details."""
        ctx.log.info("hot disk: %s %s", message, figures)
        self.decisions.append({"message": message, **figures})
        ctx.note("decisions", self.decisions[-20:])
