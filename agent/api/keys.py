"""Typed ``web.AppKey``s of the agent's aiohttp app and the small interfaces stored under them.

Kept in one module so handlers, middlewares and the app factory import keys without importing each other.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from agent.config import AgentConfig
from agent.evacuation import EvacuationService
from agent.metrics import AgentMetrics
from agent.migration.engine import EngineFactory
from agent.migration.incoming import IncomingService
from agent.report.outbox import OutboxDeliverer
from agent.report.progress import ProgressReporter
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager


class VmInventory(Protocol):
    """What the VM endpoints need from libvirt; raises ``agent.errors.NotFound`` for an unknown VM."""

    async def list_vms(self) -> list[dict[str, Any]]: ...

    async def describe_vm(self, vm_uuid: str) -> dict[str, Any]: ...


@dataclass
class ServiceState:
    """Lifecycle flags shared by middlewares and long-lived handlers (server-sent events)."""

    token: str = field(repr=False)
    #: The cluster token peer agents present beside their host certificate (``agent.api.access``).
    cluster_token: str | None = field(default=None, repr=False)
    #: Paths served without the token because their handlers apply their own access rule (the ZStack
    #: dialect's source networks, ``agent.zstack``).
    open_paths: frozenset[str] = frozenset()
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


CONFIG = web.AppKey("config", AgentConfig)
#: (method, path template) -> the role the route needs (``agent.api.routes``, ``agent.api.access``).
ROUTE_ROLES: web.AppKey[dict[tuple[str, str], Any]] = web.AppKey("route_roles")
SERVICE = web.AppKey("service", ServiceState)
METRICS = web.AppKey("metrics", AgentMetrics)
#: The engine factory tests inject; None in production (built from the virt host at startup).
ENGINE_FACTORY: web.AppKey[EngineFactory | None] = web.AppKey("engine_factory")
#: True: open a libvirt connection at startup (production); False: use ``INVENTORY`` as given.
CONNECT_LIBVIRT = web.AppKey("connect_libvirt", bool)
VIRT_HOST: web.AppKey[Any] = web.AppKey("virt_host")
INVENTORY: web.AppKey[VmInventory | None] = web.AppKey("inventory")
JOURNAL = web.AppKey("journal", Journal)
MANAGER = web.AppKey("manager", TaskManager)
SESSION = web.AppKey("client_session", aiohttp.ClientSession)
OUTBOX = web.AppKey("outbox", OutboxDeliverer)
PROGRESS = web.AppKey("progress_reporter", ProgressReporter)
#: Host evacuations (``agent.evacuation``): many VMs off this host as one operation.
EVACUATIONS = web.AppKey("evacuations", EvacuationService)
#: The destination side of cross-host migrations; None without libvirt.
INCOMING: web.AppKey[IncomingService | None] = web.AppKey("incoming")
