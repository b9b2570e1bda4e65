"""Production wiring to the layers below: the libvirt host, the VM inventory and the engine factory.

Tests build the app without it (``make_app(..., engine_factory=fake, inventory=fake)``).
"""

from __future__ import annotations

import logging
from typing import Any

from agent.config import AgentConfig
from agent.migration.engine import EngineFactory
from agent.migration.factory import make_engine_factory
from agent.virt import inventory
from agent.virt.host import VirtHost
from agent.virt.writes import WriteHistory

log = logging.getLogger(__name__)


async def open_virt_host(uri: str) -> VirtHost:
    """A ``VirtHost`` for ``uri``; it connects now if libvirtd answers, else on the first call."""
    return await VirtHost.open(uri)


class LibvirtInventory:
    """``VmInventory`` over ``agent.virt.inventory`` and an open ``VirtHost``."""

    def __init__(self, host: VirtHost) -> None:
        self._host = host

    async def list_vms(self) -> list[dict[str, Any]]:
        return await inventory.list_vms(self._host)

    async def describe_vm(self, vm_uuid: str) -> dict[str, Any]:
        return await inventory.describe_vm(self._host, vm_uuid)


def production_engine_factory(
    config: AgentConfig, host: VirtHost, history: WriteHistory | None = None
) -> EngineFactory:
    return make_engine_factory(config, host, history)
