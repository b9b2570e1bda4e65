"""What `up` decided and started, kept in /var/lib/ksa-lab/lab.json so that later runs agree with it.

Uuids are made once per lab (stable across `up`s, new after `down`). Pids and namespace inodes let `down`
find and stop exactly what the lab started, even after a crash.
"""

from __future__ import annotations

import fcntl
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .layout import BLOCK_ROOT, HOSTS, LOCK_FILE, STATE_FILE, STORAGE_ROOTS
from .sysutil import write_file


@dataclass
class HostState:
    uuid: str
    storage: dict[str, str]  # root name (STORAGE_ROOTS, BLOCK_ROOT) -> storage uuid
    netns_inode: int | None = None
    holder_pid: int | None = None
    virtlogd_pid: int | None = None
    libvirtd_pid: int | None = None
    agent_pid: int | None = None


@dataclass
class CephState:
    """The lab's Ceph cluster (labkit/ceph.py): made once per lab, daemons under a holder of their own."""

    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: The libvirt secret with the client's key, the same uuid on every host (as a cloud defines it).
    secret_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: The pool as a primary storage: one uuid on both hosts (shared storage, as a cloud configures it).
    storage_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: The second pool (``CEPH_POOL2``) as a primary storage.
    storage2_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    holder_pid: int | None = None
    mon_pid: int | None = None
    osd_pid: int | None = None


@dataclass
class LabState:
    hosts: dict[str, HostState] = field(default_factory=dict)
    agents: bool = True  # false when the agent could not be started (not written yet, or LAB_NO_AGENT=1)
    ceph: CephState = field(default_factory=CephState)

    @classmethod
    def fresh(cls) -> LabState:
        return cls(
            hosts={
                host.name: HostState(
                    uuid=str(uuid.uuid4()),
                    storage={
                        name: str(uuid.uuid4()) for name in [*(r[0] for r in STORAGE_ROOTS), BLOCK_ROOT]
                    },
                )
                for host in HOSTS
            }
        )

    @classmethod
    def load(cls) -> LabState | None:
        try:
            data = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return None
        # A state another checkout wrote may name fields this one does not know (or lack some): `lab down`
        # from either must still find every pid to stop.
        hosts = {name: HostState(**_known(HostState, host)) for name, host in data.get("hosts", {}).items()}
        for hs in hosts.values():  # a lab brought up before block storage existed
            hs.storage.setdefault(BLOCK_ROOT, str(uuid.uuid4()))
        if set(hosts) != {h.name for h in HOSTS}:
            return None
        ceph = (
            CephState(**_known(CephState, data["ceph"]))
            if isinstance(data.get("ceph"), dict)
            else CephState()
        )
        return cls(hosts=hosts, agents=bool(data.get("agents", True)), ceph=ceph)

    def save(self) -> None:
        write_file(STATE_FILE, json.dumps(asdict(self), indent=2) + "\n", 0o600)


def _known(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``kind``."""
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in data.items() if k in names}


@contextmanager
def lab_lock() -> Iterator[None]:
    """Serialise commands that change the lab (up, down, agent, link): two `up`s at once would race."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
