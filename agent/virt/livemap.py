"""Where a running disk's data is, asked of the QEMU that has it open.

An RBD image cannot be mapped by the agent itself: it holds no Ceph key (the libvirt secret is private, as
it should be). The QEMU running the guest has the image open, so the agent asks it: a read-only NBD export
of the disk's node, served on a listening socket the agent made and handed over (``getfd``: no path QEMU
must be allowed to write, whatever its user and AppArmor profile), mapped with ``qemu-img map`` (NBD's
``base:allocation``), then the export and the server are removed. The map is the one a block-status query
gives: holes of a thin image read as zeros, not as data.

One NBD server per QEMU: the map is refused while another runs (the destination of an incoming migration
has one; a same-host move's source has none).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import uuid
from typing import Any

from agent.errors import AgentError, Code, MigrationFailed
from agent.storage import qemuimg
from agent.storage.qemuimg import Extent
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost


def _node_of(blocks: Any, target: str, alias: str | None) -> str:
    """The node-name QEMU gives the top of ``target``'s chain (``query-block``), by libvirt's alias."""
    for block in blocks or []:
        names = {block.get("qdev", ""), block.get("device", "")}
        qdev = block.get("qdev", "")
        if (alias and (alias in names or qdev.endswith(f"/{alias}/virtio-backend"))) or target in names:
            inserted = block.get("inserted") or {}
            if inserted.get("node-name"):
                return str(inserted["node-name"])
    raise MigrationFailed(f"QEMU shows no block node for disk {target}", code=Code.INTERNAL)


async def _qmp(
    host: VirtHost, vm_uuid: str, command: str, arguments: dict[str, Any] | None = None, fd: int | None = None
) -> Any:
    """One QMP command (``fd``: a file handed over with it); QEMU's error is raised, naming the command."""
    import libvirt_qemu

    payload = json.dumps({"execute": command, "arguments": arguments or {}})

    def _send(dom: Any) -> str:
        if fd is None:
            return str(libvirt_qemu.qemuMonitorCommand(dom, payload, 0))
        reply, _files = libvirt_qemu.qemuMonitorCommandWithFiles(dom, payload, [fd], 0)
        return str(reply)

    answer = json.loads(await host.call_domain(vm_uuid, _send))
    if "error" in answer:
        raise MigrationFailed(
            f"QEMU refused {command} while mapping a disk: {answer['error'].get('desc', answer['error'])}",
            code=Code.INTERNAL,
        )
    return answer.get("return")


async def live_allocation(host: VirtHost, vm_uuid: str, target: str) -> list[Extent]:
    """The allocation map of running disk ``target``, as its QEMU sees it."""
    alias = next((d.alias for d in parse_disks(await host.live_xml(vm_uuid)) if d.target == target), None)
    blocks = await _qmp(host, vm_uuid, "query-block")
    node = _node_of(blocks, target, alias)
    tag = f"ksa-map-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="ksa-map-") as where:
        os.chmod(where, 0o700)  # only root reaches the export while it is up
        path = os.path.join(where, "nbd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(4)
            await _qmp(host, vm_uuid, "getfd", {"fdname": tag}, fd=listener.fileno())
        finally:
            listener.close()  # QEMU holds its own copy
        try:
            await _qmp(host, vm_uuid, "nbd-server-start", {"addr": {"type": "fd", "data": {"str": tag}}})
        except AgentError:
            # The server takes the socket over when it starts; refused, QEMU still holds it by its name.
            with contextlib.suppress(AgentError):
                await _qmp(host, vm_uuid, "closefd", {"fdname": tag})
            raise
        try:
            await _qmp(
                host,
                vm_uuid,
                "block-export-add",
                {"type": "nbd", "id": tag, "node-name": node, "name": tag, "writable": False},
            )
            try:
                return await qemuimg.allocation_map(f"nbd+unix:///{tag}?socket={path}", "raw")
            finally:
                with contextlib.suppress(AgentError):
                    await _qmp(host, vm_uuid, "block-export-del", {"id": tag, "mode": "hard"})
        finally:
            with contextlib.suppress(AgentError):
                await _qmp(host, vm_uuid, "nbd-server-stop")
