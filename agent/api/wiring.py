"""Production wiring to the layers below, imported lazily so the API runs (and is tested) without libvirt.

- ``open_virt_host``: ``agent.virt.host.VirtHost.open(uri)``;
- ``LibvirtInventory``: ``agent.virt.inventory.list_vms/describe_vm`` bound to that host;
- ``production_engine_factory``: ``agent.migration.factory.make_engine_factory(config, host)``, or a factory
  whose engines fail every task with ``AGENT.ENGINE_UNAVAILABLE`` and the reason when it cannot be built.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, cast

from agent.config import AgentConfig
from agent.errors import VirtError
from agent.tasks.hooks import EngineFactory, unavailable_engine_factory

log = logging.getLogger(__name__)


async def open_virt_host(uri: str) -> Any:
    """A connected ``VirtHost``; raises ``VirtError`` when libvirt cannot be reached."""
    try:
        module = importlib.import_module("agent.virt.host")
    except ImportError as err:
        raise VirtError("the libvirt adapter cannot be loaded", details=str(err)) from err
    return await module.VirtHost.open(uri)


class LibvirtInventory:
    """``VmInventory`` over ``agent.virt.inventory`` and an open ``VirtHost``."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self._module: Any = importlib.import_module("agent.virt.inventory")

    async def list_vms(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], await self._module.list_vms(self._host))

    async def describe_vm(self, vm_uuid: str) -> dict[str, Any]:
        return cast(dict[str, Any], await self._module.describe_vm(self._host, vm_uuid))


def production_engine_factory(config: AgentConfig, host: Any) -> EngineFactory:
    if host is None:
        return unavailable_engine_factory("libvirt is not connected in this agent")
    try:
        module: Any = importlib.import_module("agent.migration.factory")
        return cast(EngineFactory, module.make_engine_factory(config, host))
    except Exception as err:
        log.exception("the migration engines cannot be loaded; every task will fail")
        return unavailable_engine_factory(f"{type(err).__name__}: {err}")
