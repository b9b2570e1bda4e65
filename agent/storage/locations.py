"""Where a volume is, by kind: a file path, a block device path, or an RBD image.

An RBD image is written ``rbd:pool/image`` or ``rbd:pool/namespace/image`` (the agent's form, in plans,
journal and inventory); ZStack's ``ceph://pool/image`` is read too. Paths stay paths: whether a path is a
file or a block device is the kind of the storage that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import CEPH_NAME
from agent.errors import InvalidRequest

RBD_PREFIX = "rbd:"
ZSTACK_CEPH_PREFIX = "ceph://"


@dataclass(frozen=True)
class RbdImage:
    pool: str
    namespace: str
    name: str

    @property
    def spec(self) -> str:
        """``pool[/namespace]/image``: libvirt's ``<source protocol='rbd' name=...>``, ``rbd`` CLI's."""
        return "/".join(part for part in (self.pool, self.namespace, self.name) if part)

    def __str__(self) -> str:
        return RBD_PREFIX + self.spec


def is_rbd(location: str) -> bool:
    return location.startswith((RBD_PREFIX, ZSTACK_CEPH_PREFIX))


def parse_rbd(location: str, field: str) -> RbdImage:
    """``rbd:pool[/namespace]/image`` or ``ceph://pool[/namespace]/image``; a snapshot (``@snap``) or a name
    Ceph would not take is refused, naming ``field``."""
    for prefix in (RBD_PREFIX, ZSTACK_CEPH_PREFIX):
        if location.startswith(prefix):
            parts = location[len(prefix) :].split("/")
            break
    else:
        raise InvalidRequest(f"{location!r} is not an RBD location (rbd:pool/image)", field=field)
    if len(parts) not in (2, 3) or not all(CEPH_NAME.fullmatch(part) for part in parts):
        raise InvalidRequest(
            f"{location!r} is not an RBD location",
            field=field,
            details="rbd:pool/image or rbd:pool/namespace/image; names of letters, digits, '_', '.', '-'",
        )
    pool, *rest = parts
    return RbdImage(pool, rest[0] if len(rest) == 2 else "", rest[-1])
