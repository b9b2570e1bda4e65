"""Block devices a move may take: which are free on this host, and whether one still is (both live engines
and the stopped-VM engine pick and check devices the same way)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agent.errors import Code, PreflightFailed
from agent.migration.plan import DiskPlan, FreeDevice
from agent.storage import blockdir
from agent.storage.blockdir import BlockDir
from agent.virt.host import VirtHost


async def free_devices(host: VirtHost, storage: BlockDir) -> list[FreeDevice]:
    """The storage's devices a disk may take: blank, held by no one, and named by no domain of this host
    (active or defined, by path or by where the path leads)."""
    used = await used_here(host)

    def _free() -> list[FreeDevice]:
        out = []
        for device in storage.devices():
            if str(device) in used or os.path.realpath(device) in used:
                continue
            if blockdir.in_use_elsewhere(device) or not blockdir.is_blank(device):
                continue
            out.append((str(device), blockdir.device_size(device)))
        return out

    return await asyncio.to_thread(_free)


async def used_here(host: VirtHost) -> set[str]:
    """Every location a domain of this host names, and where each path leads."""
    used = await host.used_locations()
    return used | {os.path.realpath(p) for p in used if p.startswith("/")}


async def check_device(storage: BlockDir, disk: DiskPlan, used: set[str]) -> None:
    """A device asked for (or picked) is free now: blank, large enough for the disk, and named by none of
    the ``used`` locations."""
    await check_device_takes(storage, disk.dst_top, disk.target, disk.virtual_size, used, field="volumes")


async def check_device_takes(
    storage: BlockDir, location: str, target: str, size: int, used: set[str], *, field: str
) -> None:
    """Device ``location`` can take disk ``target`` of ``size`` bytes: blank, large enough, held by no one
    and named by none of the ``used`` locations (``AGENT.TARGET_EXISTS`` or ``AGENT.NO_SPACE`` otherwise)."""
    device = Path(location)
    held = await asyncio.to_thread(blockdir.device_size, device)
    problem: tuple[str, Code] | None = None
    if location in used or os.path.realpath(device) in used:
        problem = "a domain of this host uses it", Code.TARGET_EXISTS
    elif held < size:
        problem = f"it holds {held} bytes, the disk needs {size}", Code.NO_SPACE
    elif await asyncio.to_thread(blockdir.in_use_elsewhere, device):
        problem = "the kernel says someone holds it (mounted, a device-mapper table)", Code.TARGET_EXISTS
    elif not await asyncio.to_thread(blockdir.is_blank, device):
        problem = "it is not blank (its first MiB holds a label, a filesystem, an image)", Code.TARGET_EXISTS
    if problem is not None:
        raise PreflightFailed(
            f"block device {location} cannot take disk {target} of {size} bytes: " + problem[0],
            code=problem[1],
            field=field,
            details=f"choose another device of storage {storage.uuid} ({storage.path})",
        )
