"""Handlers that describe the host: health, host facts (psutil, storage roots), VMs, metrics.

Anything that may touch a slow filesystem (``shutil.disk_usage`` on a hung NFS root) runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from typing import Any

import psutil  # type: ignore[import-untyped]
from aiohttp import web

import agent
from agent.api.keys import CONFIG, INVENTORY, MANAGER, METRICS, VmInventory
from agent.api.middleware import json_response
from agent.api.validation import path_uuid
from agent.config import AgentConfig
from agent.errors import Code, VirtError
from agent.metrics import CONTENT_TYPE
from agent.storage.blockdir import BlockDir, device_size
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import Storage, StorageRoots


async def health(request: web.Request) -> web.StreamResponse:
    """``GET /v1/health`` (no token): the agent answers; 503 comes from the guard while stopping."""
    config = request.app[CONFIG]
    return json_response({"status": "ok", "version": agent.__version__, "hostUuid": config.host_uuid})


async def host(request: web.Request) -> web.StreamResponse:
    """``GET /v1/host``: cpu, memory and each storage root's free/total bytes."""
    config = request.app[CONFIG]
    storage = await storage_entries(config)
    counts = request.app[MANAGER].count_by_state()
    body = {
        "hostUuid": config.host_uuid,
        "hostname": socket.gethostname(),
        "version": agent.__version__,
        "cpu": {
            "count": psutil.cpu_count(),
            "percent": psutil.cpu_percent(interval=None),
            "loadAverage": list(os.getloadavg()),
        },
        "memory": _memory(),
        "storage": list(storage),
        "tasks": {state.value: count for state, count in counts.items() if count},
        # What the wire looks like: "tls" (HTTPS, libvirt over TLS, encrypted migration streams) or
        # "insecure" (insecure_transport = true in agent.toml).
        "transport": "insecure" if config.insecure_transport else "tls",
        "insecureTransport": config.insecure_transport,
    }
    return json_response(body)


def _memory() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    return {"totalBytes": int(mem.total), "availableBytes": int(mem.available), "percent": float(mem.percent)}


async def storage_entries(config: AgentConfig) -> list[dict[str, Any]]:
    """Every primary storage of the host, described (``GET /v1/host``, the incoming offer)."""
    roots = StorageRoots.from_config(config).every()
    return list(await asyncio.gather(*(asyncio.to_thread(storage_entry, root) for root in roots)))


def storage_entry(root: Storage) -> dict[str, Any]:
    """One primary storage: its kind and where it is (``location``; ``path`` for the kinds that have one),
    and its size as far as this host can tell without asking anyone: a file root's filesystem, the sum of a
    block directory's devices (which of them are free is the management plane's knowledge), nothing for an
    RBD pool (the cluster's figures come from Ceph)."""
    entry: dict[str, Any] = {
        "uuid": root.uuid,
        "kind": str(root.kind),
        "location": root.location,
        "path": None,
        "totalBytes": None,
        "freeBytes": None,
    }
    if isinstance(root, RbdPool):
        entry |= {
            "pool": root.pool,
            "namespace": root.namespace,
            "monitors": [f"{host}:{port}" for host, port in root.monitors],
            "user": root.user,
            "secretUuid": root.secret_uuid,
        }
        return entry
    entry["path"] = str(root.path)
    try:
        if isinstance(root, BlockDir):
            devices = root.devices()
            entry["devices"] = len(devices)
            entry["totalBytes"] = sum(device_size(device) for device in devices)
        else:
            usage = shutil.disk_usage(root.path)
            entry["totalBytes"] = usage.total
            entry["freeBytes"] = usage.free
    except OSError as err:
        entry["error"] = f"{err.strerror or err}"
    return entry


async def list_vms(request: web.Request) -> web.StreamResponse:
    """``GET /v1/vms``: the domains libvirt knows on this host."""
    return json_response({"vms": await _inventory(request).list_vms()})


async def describe_vm(request: web.Request) -> web.StreamResponse:
    """``GET /v1/vms/{vmUuid}``: one VM with its disks and their backing chains (404 when unknown)."""
    vm_uuid = path_uuid(request, "vmUuid")
    return json_response(await _inventory(request).describe_vm(vm_uuid))


def _inventory(request: web.Request) -> VmInventory:
    inventory = request.app[INVENTORY]
    if inventory is None:
        raise VirtError("libvirt is not connected in this agent", code=Code.LIBVIRT_UNAVAILABLE)
    return inventory


async def metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text format."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
