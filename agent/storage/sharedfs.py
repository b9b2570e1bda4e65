"""Whether a volume lives on a filesystem other hosts reach too (NFS, a cluster filesystem): libvirt lets a
VM migrate while leaving such a disk in place, and refuses any other disk left behind ("Migration without
shared storage is unsafe"). The agent asks the same question first, to refuse a move that would leave a
local disk behind before anything is prepared on the destination."""

from __future__ import annotations

import os
from pathlib import Path

#: Filesystem types (as /proc/self/mounts names them) that several hosts mount at once.
SHARED_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "gfs2",
        "ocfs2",
        "ceph",
        "fuse.ceph",
        "fuse.glusterfs",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.sshfs",
    }
)


def filesystem_type(path: str, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above its real path), from
    ``mounts`` (/proc/self/mounts' text; read when None); None when no mount holds it."""
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return best[1] if best else None


def is_shared(path: str, mounts: str | None = None) -> bool:
    return filesystem_type(path, mounts) in SHARED_TYPES
