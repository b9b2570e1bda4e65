"""A primary storage that is a directory of block devices, one per volume (loop devices, or an LVM volume
group's ``/dev/VG``, whose entries are symlinks to ``/dev/dm-N``).

Confinement is by name, not by where a symlink points: a volume is an entry directly in the directory
(``..``, deeper paths and other directories are refused), and what it names must be a block device.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import BlockStorageConfig, StorageKind
from agent.errors import PathOutsideRoot


@dataclass(frozen=True)
class BlockDir:
    uuid: str
    path: Path

    kind = StorageKind.BLOCK

    @classmethod
    def from_config(cls, config: BlockStorageConfig) -> BlockDir:
        return cls(config.uuid, config.path)

    @property
    def location(self) -> str:
        return str(self.path)

    def contains(self, location: str | Path) -> bool:
        """An entry directly in the directory, by name (symlinks are not followed)."""
        given = Path(location)
        if not given.is_absolute() or ".." in given.parts:
            return False
        return Path(os.path.normpath(given)).parent == Path(os.path.normpath(self.path))

    def confine(self, location: str | Path, field: str) -> Path:
        """The device's path in the directory (a bare name is taken in the directory); refused outside it or
        when it names something that is not a block device."""
        candidate = Path(location)
        if not candidate.is_absolute():
            candidate = self.path / candidate
        if not self.contains(candidate):
            raise PathOutsideRoot(
                f"{location} is not a device of storage {self.uuid} ({self.path})",
                field=field,
                details="a block volume is an entry directly in its storage's directory",
            )
        if not is_block_device(candidate):
            raise PathOutsideRoot(
                f"{location} is not a block device",
                field=field,
                details=f"storage {self.uuid} is a directory of block devices",
            )
        return Path(os.path.normpath(candidate))

    def devices(self) -> list[Path]:
        """The block devices in the directory, by name."""
        try:
            entries = sorted(self.path.iterdir())
        except OSError:
            return []
        return [entry for entry in entries if is_block_device(entry)]


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_size(path: Path) -> int:
    """A block device's size in bytes (its end, as a seek finds it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
