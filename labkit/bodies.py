"""Request bodies for the agents' API, as the lab tests and the benchmark send them (DESIGN.md)."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

_PRIMARY_STORAGE_KEYS = ("withDataVolumes", "withSnapshots", "dstHostUuid", "strategy")
_MIGRATE_VM_KEYS = ("bandwidth", "downTime")


class _Root(Protocol):
    @property
    def uuid(self) -> str: ...


class DestinationHost(Protocol):
    """What a cross-host body needs to know of the destination (a lab host of the tests or the bench)."""

    @property
    def uuid(self) -> str: ...
    @property
    def agent_url(self) -> str: ...
    @property
    def migration_address(self) -> str: ...
    def root(self, name: str) -> _Root: ...


def migration_body(dst_storage: str, **extra: Any) -> dict[str, Any]:
    """A ``PrimaryStorageMigrateVm`` body with a fresh ``taskUuid``; each extra key lands where it belongs
    (``primaryStorageMigrateVm``, ``migrateVm`` or the top level)."""
    psm: dict[str, Any] = {"dstPrimaryStorageUuid": dst_storage}
    for key in _PRIMARY_STORAGE_KEYS:
        if key in extra:
            psm[key] = extra.pop(key)
    body: dict[str, Any] = {"primaryStorageMigrateVm": psm, "taskUuid": str(uuid.uuid4())}
    migrate_vm = {k: extra.pop(k) for k in _MIGRATE_VM_KEYS if k in extra}
    if migrate_vm:
        body["migrateVm"] = migrate_vm
    body.update(extra)
    return body


def dst_host(dst: DestinationHost) -> dict[str, Any]:
    """The request's ``dstHost``: how the source reaches another lab host's agent and migration address."""
    return {"uuid": dst.uuid, "agentUrl": dst.agent_url, "migrationAddress": dst.migration_address}


def to_host_body(dst: DestinationHost, storage: str = "ps1", **extra: Any) -> dict[str, Any]:
    """A move to another lab host, into its storage root ``storage``."""
    return migration_body(dst.root(storage).uuid, dstHostUuid=dst.uuid, dstHost=dst_host(dst), **extra)


def evacuation_destination(dst: DestinationHost, incoming: int, storage: str = "ps1") -> dict[str, Any]:
    """One of an evacuation's ``destinations``: another lab host's root ``storage``, ``incoming`` at once."""
    return {
        "dstHost": dst_host(dst),
        "dstPrimaryStorageUuid": dst.root(storage).uuid,
        "incomingMigrations": incoming,
    }
