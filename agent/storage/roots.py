"""Storage roots (the primary storages this host knows by uuid) and path confinement.

A path from the network is never trusted: it must resolve, symlinks followed, to a place inside the root it
claims. Destination files the agent creates are only ever created under a root.

Primary storages of the other kinds (an RBD pool: ``rbdpool.py``, a directory of block devices:
``blockdir.py``) are known here too, with their own confinement; the moves that use them are not all done
(docs/storage.md), so ``get`` refuses them with ``StorageKindUnsupported`` and ``storage`` hands out any kind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig, BlockStorageConfig, FileStorageConfig, RbdStorageConfig, StorageKind
from agent.errors import PathOutsideRoot, StorageKindUnsupported, StorageNotFound
from agent.storage.blockdir import BlockDir
from agent.storage.confine import confined
from agent.storage.rbdpool import RbdPool


@dataclass(frozen=True)
class StorageRoot:
    """A directory of image files (the kind ``file``)."""

    uuid: str
    path: Path

    kind = StorageKind.FILE

    @property
    def location(self) -> str:
        return str(self.path)

    def usage(self) -> tuple[int, int]:
        """(free, total) bytes of the filesystem holding the root."""
        usage = shutil.disk_usage(self.path)
        return usage.free, usage.total

    def contains(self, path: str | Path) -> bool:
        root = os.path.realpath(self.path)
        real = os.path.realpath(path)
        return os.path.commonpath([root, real]) == root and real != root

    def confine(self, path: str | Path, field: str) -> Path:
        """Resolve ``path`` (relative paths are taken relative to the root) and refuse it outside the root."""
        refusal = PathOutsideRoot(
            f"{path} is not inside storage {self.uuid} ({self.path})",
            field=field,
            details="destination paths must resolve, symlinks followed, inside the destination storage",
        )
        return Path(os.path.realpath(confined(self.path, path, self.contains, refusal)))


#: A primary storage of any kind.
Storage = StorageRoot | RbdPool | BlockDir


class StorageRoots:
    """The host's primary storages, by uuid, from the config file only. Iterating gives the file roots."""

    def __init__(self, roots: list[StorageRoot], others: list[RbdPool | BlockDir] | None = None) -> None:
        self._roots = {root.uuid: root for root in roots}
        self._others = {other.uuid: other for other in others or []}

    @classmethod
    def from_config(cls, config: AgentConfig) -> StorageRoots:
        roots: list[StorageRoot] = []
        others: list[RbdPool | BlockDir] = []
        for entry in config.storage:
            if isinstance(entry, FileStorageConfig):
                roots.append(StorageRoot(entry.uuid, entry.path))
            elif isinstance(entry, RbdStorageConfig):
                others.append(RbdPool.from_config(entry))
            elif isinstance(entry, BlockStorageConfig):
                others.append(BlockDir.from_config(entry))
        return cls(roots, others)

    def __iter__(self) -> Iterator[StorageRoot]:
        return iter(self._roots.values())

    def every(self) -> list[Storage]:
        """Every primary storage, of every kind: the file roots first."""
        return [*self._roots.values(), *self._others.values()]

    def get(self, uuid: str, field: str = "primaryStorageMigrateVm.dstPrimaryStorageUuid") -> StorageRoot:
        """A file root; a storage of another kind is refused (no move onto it is done yet)."""
        storage = self.storage(uuid, field)
        if not isinstance(storage, StorageRoot):
            raise StorageKindUnsupported(
                f"storage {uuid} is of kind {storage.kind} ({storage.location}): this agent does not move "
                f"volumes onto {storage.kind} storage yet",
                field=field,
                details="moves onto file storage only; docs/storage.md says what is done",
            )
        return storage

    def storage(self, uuid: str, field: str = "primaryStorageMigrateVm.dstPrimaryStorageUuid") -> Storage:
        """The primary storage of any kind."""
        found: Storage | None = self._roots.get(uuid) or self._others.get(uuid)
        if found is None:
            known = sorted([*self._roots, *self._others])
            raise StorageNotFound(
                f"storage {uuid} is not configured on this host",
                field=field,
                details=f"known storage uuids: {', '.join(known) or 'none'}",
            ) from None
        return found

    def owner_of_location(self, location: str) -> Storage | None:
        """The storage of any kind that holds ``location`` (a file or device path, an RBD location)."""
        for other in self._others.values():
            if other.contains(location):
                return other
        if location.startswith("/"):
            return self.owner_of(location)
        return None

    def owner_of(self, path: str | Path) -> StorageRoot | None:
        for root in self._roots.values():
            if root.contains(path):
                return root
        return None
