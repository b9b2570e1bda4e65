"""Choosing the engine for a request: same host (block copy) or another host (live migration)."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig
from agent.errors import InvalidRequest
from agent.migration.crosshost import CrossHostEngine
from agent.migration.engine import Engine
from agent.migration.request import MigrationRequest
from agent.migration.samehost import SameHostEngine
from agent.storage.roots import StorageRoots
from agent.virt.host import VirtHost

EngineFactory = Callable[[MigrationRequest, str, bool], Engine]


def is_same_host(request: MigrationRequest, config: AgentConfig) -> bool:
    dst = request.primaryStorageMigrateVm.dstHostUuid
    return not dst or dst == config.host_uuid


def make_engine_factory(config: AgentConfig, host: VirtHost) -> EngineFactory:
    roots = StorageRoots.from_config(config)

    def factory(request: MigrationRequest, vm_uuid: str, resume: bool) -> Engine:
        if is_same_host(request, config):
            return SameHostEngine(host, roots)
        if request.dstHost is None or not request.dstHost.agentUrl:
            raise InvalidRequest(
                "a move to another host needs dstHost with the destination agent's agentUrl",
                field="dstHost.agentUrl",
            )
        return CrossHostEngine(host, roots, config)

    return factory
