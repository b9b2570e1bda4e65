"""What ``GET /v1/vms`` and ``GET /v1/vms/{uuid}`` show: domains and their disks with backing chains."""

from __future__ import annotations

from typing import Any

from agent.errors import StorageError
from agent.storage import qemuimg
from agent.virt.domxml import domain_name, parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState


async def list_vms(host: VirtHost) -> list[dict[str, Any]]:
    return await host.list_domains()


async def describe_vm(host: VirtHost, vm_uuid: str) -> dict[str, Any]:
    """The domain with every disk; file disks carry their qemu-img chain (top first)."""
    state = await host.domain_state(vm_uuid)
    xml = await host.live_xml(vm_uuid) if state != DomainState.SHUTOFF else await host.inactive_xml(vm_uuid)
    disks = []
    for disk in parse_disks(xml):
        entry: dict[str, Any] = {
            "target": disk.target,
            "device": disk.device,
            "type": disk.type,
            "source": disk.source,
            "location": disk.location,
            "format": disk.format,
            "serial": disk.serial,
            "readonly": disk.readonly,
            "shareable": disk.shareable,
            "bootOrder": disk.boot_order,
            "blockJob": disk.mirror,
            "chain": [],
        }
        if disk.type == "file" and disk.source:
            try:
                entry["chain"] = [
                    {
                        "path": layer.path,
                        "format": layer.format,
                        "virtualSize": layer.virtual_size,
                        "actualSize": layer.actual_size,
                        "backing": layer.backing,
                    }
                    for layer in await qemuimg.backing_chain(disk.source)
                ]
            except StorageError as err:
                entry["chainError"] = err.description
        disks.append(entry)
    return {
        "uuid": vm_uuid,
        "name": domain_name(xml),
        "state": state,
        "persistent": await host.is_persistent(vm_uuid),
        "disks": disks,
    }
