"""Choosing the engine for a request: same host or another host, VM running or shut off."""

from __future__ import annotations

from typing import Any

from agent.config import AgentConfig
from agent.errors import InvalidRequest
from agent.migration.crosshost import CrossHostEngine
from agent.migration.engine import Engine, EngineFactory, TaskContext
from agent.migration.offline import offline_engine
from agent.migration.request import MigrationRequest
from agent.migration.samehost import SameHostEngine
from agent.storage.roots import StorageRoots
from agent.virt.host import VirtHost
from agent.virt.states import DomainState
from agent.virt.writes import WriteHistory


def is_same_host(request: MigrationRequest, config: AgentConfig) -> bool:
    dst = request.primaryStorageMigrateVm.dstHostUuid
    return not dst or dst == config.host_uuid


class ByVmState:
    """Picks the live or the offline engine when the task runs (the VM's state then is what counts); a
    resumed task goes back to the engine that journalled it."""

    name = "auto"

    def __init__(self, live: Engine, offline: Engine, host: VirtHost) -> None:
        self.live, self.offline, self.host = live, offline, host

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        if ctx.resume_data:
            engine = self.offline if ctx.resume_data.get("engine") == "offline" else self.live
        else:
            state = await self.host.domain_state(ctx.vm_uuid)
            engine = self.offline if state == DomainState.SHUTOFF else self.live
        ctx.note("engine", engine.name)
        return await engine.run(ctx)


def make_engine_factory(
    config: AgentConfig, host: VirtHost, history: WriteHistory | None = None
) -> EngineFactory:
    """``history``: the guests' write counters sampled before each request (a capped move reads its disks'
    write rates there instead of measuring them first)."""
    roots = StorageRoots.from_config(config)
    wedged: set[str] = set()  # the host's, across tasks (CrossHostEngine)

    def factory(request: MigrationRequest, vm_uuid: str, resume: bool) -> Engine:
        same_host = is_same_host(request, config)
        if not same_host and (request.dstHost is None or not request.dstHost.agentUrl):
            raise InvalidRequest(
                "a move to another host needs dstHost with the destination agent's agentUrl",
                field="dstHost.agentUrl",
            )
        live: Engine = (
            SameHostEngine(host, roots, history=history)
            if same_host
            else CrossHostEngine(host, roots, config, wedged=wedged, history=history)
        )
        return ByVmState(live, offline_engine(host, roots, config, same_host=same_host), host)

    return factory
