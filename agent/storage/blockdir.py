"""A primary storage that is a directory of block devices, one per volume (loop devices, or an LVM volume
group's ``/dev/VG``, whose entries are symlinks to ``/dev/dm-N``).

Confinement is by name, not by where a symlink points: a volume is an entry directly in the directory
(``..``, deeper paths and other directories are refused), and what it names must be a block device.

A device the agent writes must be blank first (``is_blank``: its first MiB reads as zeros, so it holds no
partition table, LVM label, filesystem or image header) and not in use. A failed or cancelled move gives it
back blank (``release``): its first MiB zeroed (BLKZEROOUT), the rest discarded (BLKDISCARD) where the device
supports it, so a thin device (a loop device's sparse file, a thin LV) gets its space back; on a device
without discard the guest data past the first MiB stays, unreadable as a volume without its header.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.config import BlockStorageConfig, StorageKind
from agent.errors import PathOutsideRoot
from agent.storage.confine import confined


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
        candidate = confined(
            self.path,
            location,
            self.contains,
            PathOutsideRoot(
                f"{location} is not a device of storage {self.uuid} ({self.path})",
                field=field,
                details="a block volume is an entry directly in its storage's directory",
            ),
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


#: The head of a device that must read as zeros for it to count as blank, and that ``release`` zeroes: where
#: a partition table, an LVM label, a filesystem superblock or a qcow2 header and its first tables are.
BLANK_HEAD = 1 << 20

_BLKDISCARD = 0x1277  # _IO(0x12, 119)
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)


def is_blank(path: Path) -> bool:
    """The first ``BLANK_HEAD`` bytes read as zeros."""
    with open(path, "rb", buffering=0) as handle:
        head = handle.read(BLANK_HEAD)
    return head.count(0) == len(head)


def in_use_elsewhere(path: Path) -> bool:
    """The kernel says someone holds the device exclusively (mounted, a device-mapper table, a RAID member):
    an exclusive open fails with EBUSY. QEMU does not open devices exclusively: domains are checked apart."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as err:
        if err.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def _range_ioctl(fd: int, request: int, start: int, length: int) -> bool:
    """BLKDISCARD / BLKZEROOUT over [start, start + length); False when the device does not support it."""
    try:
        fcntl.ioctl(fd, request, struct.pack("QQ", start, length))
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            return False
        raise
    return True


def release(path: Path) -> bool:
    """Give a device this agent wrote back blank: its head zeroed, the rest discarded where supported.
    Returns whether the rest was discarded."""
    size = device_size(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        head = min(BLANK_HEAD, size)
        if not _range_ioctl(fd, _BLKZEROOUT, 0, head):
            os.pwrite(fd, bytes(head), 0)
        discarded = size <= head or _range_ioctl(fd, _BLKDISCARD, head, size - head)
        os.fsync(fd)
    finally:
        os.close(fd)
    return discarded
