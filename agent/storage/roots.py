"""Storage roots (the primary storages this host knows by uuid) and path confinement.

A path from the network is never trusted: it must resolve, symlinks followed, to a place inside the root it
claims. Destination files the agent creates are only ever created under a root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import PathOutsideRoot, StorageNotFound


@dataclass(frozen=True)
class StorageRoot:
    uuid: str
    path: Path

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
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.path / candidate
        if not self.contains(candidate):
            raise PathOutsideRoot(
                f"{path} is not inside storage {self.uuid} ({self.path})",
                field=field,
                details="destination paths must resolve, symlinks followed, inside the destination storage",
            )
        return Path(os.path.realpath(candidate))


class StorageRoots:
    """The host's storage roots, by uuid, from the config file only."""

    def __init__(self, roots: list[StorageRoot]) -> None:
        self._roots = {root.uuid: root for root in roots}

    @classmethod
    def from_config(cls, config: AgentConfig) -> StorageRoots:
        return cls([StorageRoot(r.uuid, r.path) for r in config.storage])

    def __iter__(self) -> Iterator[StorageRoot]:
        return iter(self._roots.values())

    def get(self, uuid: str, field: str = "primaryStorageMigrateVm.dstPrimaryStorageUuid") -> StorageRoot:
        try:
            return self._roots[uuid]
        except KeyError:
            raise StorageNotFound(
                f"storage {uuid} is not configured on this host",
                field=field,
                details=f"known storage uuids: {', '.join(sorted(self._roots)) or 'none'}",
            ) from None

    def owner_of(self, path: str | Path) -> StorageRoot | None:
        for root in self._roots.values():
            if root.contains(path):
                return root
        return None
