"""A primary storage that is a Ceph RBD pool (and namespace): confinement of image names to it, and how
libvirt reaches it (monitors, cephx user, the libvirt secret holding the user's key)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import CEPH_NAME, RbdStorageConfig, StorageKind
from agent.errors import InvalidRequest, PathOutsideRoot
from agent.storage.locations import RbdImage, is_rbd, parse_rbd


@dataclass(frozen=True)
class RbdPool:
    uuid: str
    pool: str
    namespace: str
    monitors: tuple[tuple[str, int], ...]
    user: str
    secret_uuid: str
    #: The keyring holding the user's key for the agent's own reads and writes (``rbdkey``), if configured.
    keyring: str | None = None

    kind = StorageKind.RBD

    @classmethod
    def from_config(cls, config: RbdStorageConfig) -> RbdPool:
        return cls(
            config.uuid,
            config.pool,
            config.namespace,
            tuple(config.monitor_hosts()),
            config.user,
            config.secret_uuid,
            None if config.keyring is None else str(config.keyring),
        )

    @property
    def location(self) -> str:
        """``rbd:pool[/namespace]``: where its images are."""
        return "rbd:" + "/".join(part for part in (self.pool, self.namespace) if part)

    def contains(self, location: str) -> bool:
        if not is_rbd(location):
            return False
        try:
            image = parse_rbd(location, "location")
        except InvalidRequest:
            return False
        return (image.pool, image.namespace) == (self.pool, self.namespace)

    def confine(self, location: str, field: str) -> RbdImage:
        """An image of this pool and namespace: ``location`` is a bare image name or an RBD location that
        names them."""
        if not is_rbd(location) and CEPH_NAME.fullmatch(location):
            return RbdImage(self.pool, self.namespace, location)
        image = parse_rbd(location, field) if is_rbd(location) else None
        if image is None or (image.pool, image.namespace) != (self.pool, self.namespace):
            raise PathOutsideRoot(
                f"{location} is not an image of storage {self.uuid} ({self.location})",
                field=field,
                details="an RBD target names the destination storage's pool and namespace, or only the image",
            )
        return image
