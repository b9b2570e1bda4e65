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
    device = Path(disk.dst_top)
    size = await asyncio.to_thread(blockdir.device_size, device)
    problem: tuple[str, Code] | None = None
    if disk.dst_top in used or os.path.realpath(device) in used:
        problem = "a domain of this host uses it", Code.TARGET_EXISTS
    elif size < disk.virtual_size:
        problem = f"it holds {size} bytes, the disk needs {disk.virtual_size}", Code.NO_SPACE
    elif await asyncio.to_thread(blockdir.in_use_elsewhere, device):
        problem = "the kernel says someone holds it (mounted, a device-mapper table)", Code.TARGET_EXISTS
    elif not await asyncio.to_thread(blockdir.is_blank, device):
        problem = "it is not blank (its first MiB holds a label, a filesystem, an image)", Code.TARGET_EXISTS
    if problem is not None:
        raise PreflightFailed(
            f"block device {disk.dst_top} cannot take disk {disk.target} of {disk.virtual_size} bytes: "
            + problem[0],
            code=problem[1],
            field="volumes",
            details=f"choose another device of storage {storage.uuid} ({storage.path})",
        )
