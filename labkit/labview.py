"""The lab as ``scripts/lab status --json`` describes it to its users (the lab tests, the benchmark): each
host with its addresses, libvirt URI, agent URL, storage roots and block devices, and the Ceph cluster."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .sysutil import LabError
from .virsh import virsh


@dataclass(frozen=True)
class StorageRoot:
    name: str
    uuid: str
    path: Path
    kind: str = "file"  # or "block" (the Ceph pool is the lab's ``CephCluster``)


@dataclass(frozen=True)
class LabHost:
    name: str
    uuid: str
    address: str
    libvirt_uri: str
    agent_url: str
    migration_address: str
    storage: tuple[StorageRoot, ...]
    agent_config: Path
    #: A directory of symlinks to the host's block devices (loop devices).
    block_root: Path

    #: What a failed ``virsh`` raises (tests' subclass: AssertionError; the benchmark's: its own error), and
    #: how long a virsh command may take by default.
    virsh_failure: ClassVar[type[Exception]] = LabError
    virsh_timeout: ClassVar[float] = 120

    def root(self, name: str) -> StorageRoot:
        return next(r for r in self.storage if r.name == name)

    def root_of(self, path: str | Path) -> StorageRoot:
        """The root that holds the file ``path``."""
        return next(r for r in self.storage if Path(path).parent == r.path)

    def virsh(self, *args: str, check: bool = True, timeout: float | None = None) -> str:
        """virsh on this host as an operator runs it (``virsh -c libvirtUri``)."""
        return virsh(
            self.libvirt_uri,
            *args,
            check=check,
            timeout=timeout or self.virsh_timeout,
            failure=self.virsh_failure,
        )


H = TypeVar("H", bound=LabHost)


def hosts_from_status(doc: Mapping[str, Any], host_type: type[H]) -> tuple[H, ...]:
    """The hosts of a status document, as ``host_type`` (``LabHost`` or a subclass)."""
    return tuple(
        host_type(
            name=h["name"],
            uuid=h["uuid"],
            address=h["address"],
            libvirt_uri=h["libvirtUri"],
            agent_url=h["agentUrl"],
            migration_address=h["migrationAddress"],
            storage=tuple(
                StorageRoot(s["name"], s["uuid"], Path(s["path"]), s.get("kind", "file"))
                for s in h["storage"]
            ),
            agent_config=Path(h["agentConfig"]),
            block_root=Path(h["blockRoot"]),
        )
        for h in doc["hosts"]
    )


@dataclass(frozen=True)
class CephCluster:
    """The lab's Ceph: where its monitor listens, the pool and cephx user the hosts use, the uuid of the
    libvirt secret every host holds, and the admin's configuration (for ``rbd -c conf`` from the root
    namespace)."""

    monitors: tuple[str, ...]
    pool: str
    user: str
    secret_uuid: str
    #: The pool as the agents' primary storage of kind rbd: one uuid on both hosts.
    storage_uuid: str
    conf: Path
    #: The second pool of the same cluster and its storage uuid (pool -> pool moves).
    pool2: str = ""
    storage2_uuid: str = ""

    @property
    def monitor_host(self) -> str:
        return self.monitors[0].rsplit(":", 1)[0]

    @property
    def monitor_port(self) -> int:
        return int(self.monitors[0].rsplit(":", 1)[1])

    def rbd_argv(self, *args: str) -> list[str]:
        """The ``rbd`` command as the cluster's admin."""
        return ["rbd", "-c", str(self.conf), *args]

    def qemu_uri(self, image: str) -> str:
        """``image`` (pool/name) as qemu-img and qemu-io name it, reached as the admin."""
        return f"rbd:{image}:conf={self.conf}"


def ceph_from_status(doc: Mapping[str, Any]) -> CephCluster:
    c = doc["ceph"]
    return CephCluster(
        monitors=tuple(c["monitors"]),
        pool=c["pool"],
        user=c["user"],
        secret_uuid=c["secretUuid"],
        storage_uuid=c["storageUuid"],
        conf=Path(c["conf"]),
        pool2=c.get("pool2", ""),
        storage2_uuid=c.get("storage2Uuid", ""),
    )
