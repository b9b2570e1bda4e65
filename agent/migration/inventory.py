"""The seed-shaped inventory of a VM's volumes after a migration (what the management plane records)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.migration.peer.wire import Prepared
from agent.migration.plan import MigrationPlan
from agent.storage import qemuimg
from agent.storage.qemuimg import ImageInfo
from agent.storage.roots import StorageRoots
from agent.virt.domxml import DiskXml


async def volume_inventory(
    disks: Sequence[DiskXml], plan: MigrationPlan, roots: StorageRoots
) -> list[dict[str, Any]]:
    """Every file, block or RBD disk of the VM as it is now: moved ones at their new locations, the others
    where they stay. An RBD image is named ``rbd:pool/image``; its sizes are Ceph's (the agent has no key
    to read them with): the planned virtual size of a moved one, no actual size."""
    planned = {d.target: d for d in plan.disks}
    out: list[dict[str, Any]] = []
    for disk in disks:
        if disk.device != "disk" or not disk.location:
            continue
        moved = planned.get(disk.target)
        if disk.type == "network" and disk.location.startswith("rbd:"):
            size = moved.virtual_size if moved else None
            top: dict[str, Any] = {"installPath": disk.location, "format": disk.format, "size": size}
            top["actualSize"] = None
            # Lower layers the move kept as the image's snapshots, newest first as a chain is listed.
            below: list[dict[str, Any]] = [
                {
                    "installPath": layer.dst,
                    "format": "raw",
                    "size": layer.virtual_size,
                    "actualSize": None,
                    "primaryStorageUuid": plan.dst_storage_uuid,
                }
                for layer in reversed(moved.lower_layers if moved else ())
                if layer.dst.startswith(disk.location + "@")
            ]
        elif disk.type in ("file", "block") and disk.source:
            chain = await qemuimg.backing_chain(disk.source, disk.format)
            top = _layer(chain[0], roots) | {"size": disk.slice_size or chain[0].virtual_size}
            below = [_layer(layer, roots) for layer in chain[1:]]
        else:
            continue
        owner = roots.owner_of_location(top["installPath"])
        out.append(
            {
                "uuid": moved.volume_uuid if moved else (disk.serial or disk.target),
                "deviceName": disk.target,
                "type": moved.role if moved else "Data",
                "moved": moved is not None,
                **top,
                "primaryStorageUuid": owner.uuid if owner else None,
                "backingChain": below,
            }
        )
    return out


def _layer(layer: ImageInfo, roots: StorageRoots) -> dict[str, Any]:
    owner = roots.owner_of_location(layer.path)
    return {
        "installPath": layer.path,
        "format": layer.format,
        "size": layer.virtual_size,
        "actualSize": layer.actual_size,
        "primaryStorageUuid": owner.uuid if owner else None,
    }


def remote_inventory(vm: Mapping[str, Any], plan: MigrationPlan) -> list[dict[str, Any]]:
    """The seed-shaped inventory from the destination agent's view of the VM."""
    planned = {d.target: d for d in plan.disks}
    out = []
    for disk in vm.get("disks", []):
        if disk.get("device") != "disk" or not disk.get("chain"):
            continue
        moved = planned.get(disk["target"])
        top, *below = disk["chain"]
        storage = plan.dst_storage_uuid if moved else None
        out.append(
            {
                "uuid": moved.volume_uuid if moved else (disk.get("serial") or disk["target"]),
                "deviceName": disk["target"],
                "type": moved.role if moved else "Data",
                "moved": moved is not None,
                "installPath": top["path"],
                "primaryStorageUuid": storage,
                "format": top["format"],
                "size": top["virtualSize"],
                "actualSize": top["actualSize"],
                "backingChain": [
                    {
                        "installPath": layer["path"],
                        "format": layer["format"],
                        "size": layer["virtualSize"],
                        "actualSize": layer["actualSize"],
                        "primaryStorageUuid": storage,
                    }
                    for layer in below
                ],
            }
        )
    return out


def planned_inventory(plan: MigrationPlan, prepared: Prepared) -> list[dict[str, Any]]:
    """The seed-shaped inventory of the moved volumes from the plan and the prepared paths, for when the
    destination agent cannot describe the VM (sizes as planned; ``actualSize`` unknown)."""
    out = []
    for disk in plan.disks:
        placed = prepared.disk(disk.target)
        below = list(reversed(placed.layers))  # prepared lists them base first
        out.append(
            {
                "uuid": disk.volume_uuid,
                "deviceName": disk.target,
                "type": disk.role,
                "moved": True,
                "installPath": placed.top,
                "primaryStorageUuid": plan.dst_storage_uuid,
                "format": disk.dst_format,
                "size": disk.virtual_size,
                "actualSize": None,
                "backingChain": [
                    {
                        "installPath": path,
                        "format": layer.format,
                        "size": layer.virtual_size,
                        "actualSize": layer.actual_size,
                        "primaryStorageUuid": plan.dst_storage_uuid,
                    }
                    for path, layer in zip(below, reversed(disk.lower_layers), strict=False)
                ],
            }
        )
    return out
