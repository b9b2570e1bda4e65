"""The seed-shaped inventory of a VM's volumes after a migration (what the management plane records)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.migration.plan import MigrationPlan
from agent.storage import qemuimg
from agent.storage.roots import StorageRoots
from agent.virt.domxml import DiskXml


async def volume_inventory(
    disks: Sequence[DiskXml], plan: MigrationPlan, roots: StorageRoots
) -> list[dict[str, Any]]:
    """Every file disk of the VM as it is now: moved ones at their new paths, the others where they stay."""
    planned = {d.target: d for d in plan.disks}
    out: list[dict[str, Any]] = []
    for disk in disks:
        if disk.device != "disk" or disk.type != "file" or not disk.source:
            continue
        chain = await qemuimg.backing_chain(disk.source)
        top = chain[0]
        owner = roots.owner_of(top.path)
        moved = planned.get(disk.target)
        out.append(
            {
                "uuid": moved.volume_uuid if moved else (disk.serial or disk.target),
                "deviceName": disk.target,
                "type": moved.role if moved else "Data",
                "moved": moved is not None,
                "installPath": top.path,
                "primaryStorageUuid": owner.uuid if owner else None,
                "format": top.format,
                "size": top.virtual_size,
                "actualSize": top.actual_size,
                "backingChain": [
                    {
                        "installPath": layer.path,
                        "format": layer.format,
                        "size": layer.virtual_size,
                        "actualSize": layer.actual_size,
                        "primaryStorageUuid": (r.uuid if (r := roots.owner_of(layer.path)) else None),
                    }
                    for layer in chain[1:]
                ],
            }
        )
    return out
