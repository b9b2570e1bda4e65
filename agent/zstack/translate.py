"""ZStack commands as the agent's own migration requests (``MigrationRequest``, ``targetsPrecreated``).

- ``/vm/blklivemigration``: same host, exactly one volume: ``volumes`` names it with its pre-created target.
  The target decides the copy: a flat target is filled completely, a target with a backing file gets only
  the top layer (its chain must already be in place; the engine compares it with the source's).
- ``/vm/migrate``: another host; ``disks`` lists every moving volume with its pre-created target. The
  destination agent (at ``destHostManagementIp``, same port and scheme as this one, cluster token) tells its
  host uuid and which of its storage roots holds the targets. ``storageMigrationPolicy`` FullCopy (or
  absent) flattens into the targets, IncCopy copies only the top layers onto targets whose chains are in
  place (checked by the destination before anything moves).
Bandwidth (MiB/s) is the task's one budget, whatever ZStack divided it into per disk.

Nothing ZStack sends reaches qemu-img or an HTTP client unparsed: install paths are absolute and normal
(no ``..``, no ``protocol:`` prefix qemu would follow) and confined in a storage root before qemu-img sees
them (``confined_path``); host addresses are an IP address or a DNS name, nothing else (``host_address``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

import aiohttp

from agent.client import AgentClient, ClientError
from agent.config import AgentConfig
from agent.errors import Code, InvalidRequest, MigrationFailed, PreflightFailed, StorageError
from agent.migration.peer.client import DestinationAgent
from agent.migration.request import MigrationRequest, Strategy, normalise_uuid
from agent.security import client_context
from agent.storage import qemuimg
from agent.storage.locations import is_rbd, parse_rbd
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoots
from agent.zstack.wire import BlockLiveMigrationCmd, MigrateVmCmd

#: The engine gives up this long before ZStack does, so ZStack hears the real outcome, not its own timeout.
REPLY_MARGIN_S = 10.0
#: The longest task timeout a request may carry.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def host_address(raw: str, field: str) -> str:
    """An IP address or a DNS name (no port, scheme, path or user)."""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        if not _HOSTNAME.match(raw):
            raise InvalidRequest(
                f"{field} {raw!r} is not an IP address or a host name", field=field
            ) from None
        return raw


def confined_path(raw: str, roots: StorageRoots, field: str) -> str:
    """``raw`` if it is absolute and normal and resolves inside one of this host's storage roots; the
    resolved path (what qemu-img may open) is returned."""
    if not raw.startswith("/") or os.path.normpath(raw) != raw or "\x00" in raw:
        raise InvalidRequest(f"{field} {raw!r} is not an absolute, normal path", field=field)
    root = roots.owner_of(raw)
    if root is None:
        raise InvalidRequest(f"{field} {raw} is not inside a primary storage of this host", field=field)
    return str(root.confine(raw, field))


def vm_uuid_of(raw: str) -> str:
    try:
        return normalise_uuid(raw)
    except ValueError as err:
        raise InvalidRequest(f"vmUuid {raw!r} is not a uuid", field="vmUuid") from err


def task_timeout(remaining: float | None, own: int | None = None) -> float | None:
    limits = [limit for limit in (remaining, float(own) if own else None) if limit]
    if not limits:
        return None
    return min(MAX_TIMEOUT_S, max(1.0, min(limits) - REPLY_MARGIN_S))


def _bandwidth(value: int | None) -> int | None:
    """0 and null both mean uncapped (negative values are refused by the wire model)."""
    return value or None


async def block_copy_request(
    cmd: BlockLiveMigrationCmd, task_uuid: str, config: AgentConfig, remaining: float | None
) -> MigrationRequest:
    target = cmd.newVolume.installPath
    roots = StorageRoots.from_config(config)
    owner = roots.owner_of_location(target)  # ZStack names an RBD target ceph://pool/image
    if isinstance(owner, RbdPool):
        # ZStack made the image (of the disk's size): mirrored into whole, the chain flattened into it.
        return _request(cmd, task_uuid, remaining, owner.uuid, with_snapshots=False)
    if owner is not None:
        roots.get(owner.uuid, field="newVolume.installPath")  # a kind not moved onto yet: refused
    real = confined_path(target, roots, "newVolume.installPath")
    root = roots.owner_of(real)
    assert root is not None  # confined_path found it
    try:
        info = await qemuimg.info(real)
    except StorageError as err:
        raise PreflightFailed(
            f"the pre-created target {target} cannot be read",
            code=Code.TARGET_MISMATCH,
            field="newVolume.installPath",
            details=err.details,
        ) from err
    return _request(cmd, task_uuid, remaining, root.uuid, with_snapshots=info.backing is not None)


def _request(
    cmd: BlockLiveMigrationCmd, task_uuid: str, remaining: float | None, storage: str, *, with_snapshots: bool
) -> MigrationRequest:
    return MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {
                "dstPrimaryStorageUuid": storage,
                "withDataVolumes": True,
                "withSnapshots": with_snapshots,
            },
            "migrateVm": {"bandwidth": _bandwidth(cmd.bandwidth)},
            "taskUuid": task_uuid,
            "timeout": task_timeout(remaining),
            "volumes": [
                {
                    "uuid": cmd.newVolume.volumeUuid,
                    "installPath": cmd.oldVolumePath,
                    "dstInstallPath": cmd.newVolume.installPath,
                }
            ],
            "targetsPrecreated": True,
        }
    )


def agent_url_of(host: str, config: AgentConfig, field: str = "destHostManagementIp") -> str:
    scheme = "https" if config.tls_cert else "http"
    address = host_address(host, field)
    return f"{scheme}://{f'[{address}]' if ':' in address else address}:{config.port}"


async def destination_host(
    agent_url: str, config: AgentConfig, session: aiohttp.ClientSession
) -> dict[str, Any]:
    """The destination agent's uuid and storage roots (``GET /v1/incoming-migrations``, a peer's call)."""
    client = AgentClient(
        agent_url, config.read_cluster_token(), session=session, ssl_context=client_context(config)
    )
    try:
        # Over TLS: the destination verified with the cluster CA, this host's certificate presented.
        answer: dict[str, Any] = await DestinationAgent(client).offer()
        return answer
    except ClientError as err:
        raise MigrationFailed(
            f"the destination agent at {agent_url} cannot be asked for its storage: {err}",
            code=Code.PEER_UNREACHABLE,
            details="destHostManagementIp must reach the destination's kvm-storage-agent",
        ) from err


def _root_holding(paths: list[str], roots: list[dict[str, Any]]) -> str:
    """The one storage of the destination that holds every target: a directory that contains the path, or
    the RBD pool (and namespace) a ``ceph://pool/image`` names."""
    found: set[str] = set()
    for path in paths:
        owner = _rbd_owner(path, roots) if is_rbd(path) else _directory_owner(path, roots)
        if owner is None:
            raise InvalidRequest(
                f"{path} is not inside a primary storage of the destination host", field="disks"
            )
        found.add(owner)
    if len(found) != 1:
        raise InvalidRequest(
            "the new volumes are spread over several primary storages; one migration fills one",
            field="disks",
        )
    return found.pop()


def _directory_owner(path: str, roots: list[dict[str, Any]]) -> str | None:
    norm = os.path.normpath(path)
    return next(
        (
            str(root["uuid"])
            for root in roots
            if root.get("path")  # an RBD pool has none
            and (base := os.path.normpath(str(root["path"])))
            and norm != base
            and os.path.commonpath([base, norm]) == base
        ),
        None,
    )


def _rbd_owner(location: str, roots: list[dict[str, Any]]) -> str | None:
    image = parse_rbd(location, "disks")
    return next(
        (
            str(root["uuid"])
            for root in roots
            if root.get("kind") == "rbd"
            and root.get("pool") == image.pool
            and (root.get("namespace") or "") == image.namespace
        ),
        None,
    )


async def migrate_request(
    cmd: MigrateVmCmd,
    task_uuid: str,
    config: AgentConfig,
    session: aiohttp.ClientSession,
    remaining: float | None,
) -> MigrationRequest:
    if cmd.migrateFromDestination:
        raise InvalidRequest(
            "migrateFromDestination is not supported: send /vm/migrate to the source host",
            field="migrateFromDestination",
        )
    if not cmd.disks:
        raise InvalidRequest(
            "disks is empty: this agent moves storage; a migration on shared storage is not its job",
            field="disks",
        )
    migration_address = host_address(cmd.destHostIp, "destHostIp")
    agent_url = agent_url_of(
        cmd.destHostManagementIp or cmd.destHostIp,
        config,
        "destHostManagementIp" if cmd.destHostManagementIp else "destHostIp",
    )
    host = await destination_host(agent_url, config, session)
    dst_uuid = normalise_uuid(str(host.get("hostUuid")))
    if dst_uuid == config.host_uuid:
        raise InvalidRequest("the destination is this host", field="destHostManagementIp")
    storage = _root_holding([to.installPath for to in cmd.disks.values()], list(host.get("storage") or []))
    return MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {
                "dstPrimaryStorageUuid": storage,
                "withDataVolumes": True,
                "withSnapshots": cmd.storageMigrationPolicy == "IncCopy",
                "dstHostUuid": dst_uuid,
                "strategy": Strategy.AUTO_CONVERGE if cmd.autoConverge else Strategy.AUTO,
            },
            "migrateVm": {
                "downTime": min(max(cmd.downTime, 1), 600_000) if cmd.downTime else 300,
                "bandwidth": _bandwidth(cmd.bandwidth),
            },
            "dstHost": {"uuid": dst_uuid, "agentUrl": agent_url, "migrationAddress": migration_address},
            "taskUuid": task_uuid,
            "timeout": task_timeout(remaining, cmd.timeout),
            "volumes": [
                {"uuid": to.volumeUuid, "installPath": old, "dstInstallPath": to.installPath}
                for old, to in cmd.disks.items()
            ],
            "targetsPrecreated": True,
        }
    )
