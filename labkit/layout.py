"""The lab's fixed shape: names, addresses and paths that tests, the agent config and humans rely on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
AGENT_BIN = VENV_BIN / "kvm-storage-agent"

#: Several labs can live side by side on one machine (two checkouts, two developers): ``KSA_LAB_INSTANCE=N``
#: (0-9, default 0) gives instance N its own directory, bridge, subnet, namespace and link names. Instance 0
#: keeps the historical names. The caches (guest image, libvirt capabilities) are shared.
INSTANCE = int(os.environ.get("KSA_LAB_INSTANCE") or "0")
if not 0 <= INSTANCE <= 9:
    raise SystemExit(f"KSA_LAB_INSTANCE must be 0-9, not {INSTANCE}")
SUFFIX = str(INSTANCE) if INSTANCE else ""

LAB_DIR = Path(f"/var/lib/ksa-lab{SUFFIX}")
CACHE_DIR = Path("/var/cache/ksa-lab")
STATE_FILE = LAB_DIR / "lab.json"
TOKEN_FILE = LAB_DIR / "token"
#: What the agents present to each other beside their host certificates (a peer's token, not the
#: management plane's: agent/api/access.py).
CLUSTER_TOKEN_FILE = LAB_DIR / "cluster-token"
GUESTS_DIR = LAB_DIR / "guests"
TMP_DIR = LAB_DIR / "tmp"
#: The lab's cluster CA (agent pki init), the hosts' /etc/pki trees and the operator's client certificate
#: (libvirt's pkipath layout, for `virsh -c qemu+tls://ADDR/system?pkipath=...` from the root namespace).
PKI_DIR = LAB_DIR / "pki"
CA_FILE = PKI_DIR / "ca" / "cacert.pem"
OPERATOR = "operator"
OPERATOR_PKI = PKI_DIR / "clients" / OPERATOR
#: Present when the lab was brought up with `scripts/lab up --insecure` (plain TCP and HTTP, as before TLS).
INSECURE_FILE = LAB_DIR / "insecure"
# The lock lives in the cache dir because `down` deletes LAB_DIR while holding it.
LOCK_FILE = CACHE_DIR / f"lab{SUFFIX}.lock"

BRIDGE = f"ksabr{INSTANCE}"
BRIDGE_ADDRESS = f"10.213.{INSTANCE}.1"
PREFIX_LEN = 24
AGENT_PORT = 7070
LIBVIRT_TCP_PORT = 16509

LIBVIRT_TLS_PORT = 16514

# Directories every host gets its own copy of, bind-mounted over the system path inside its mount namespace
# (/etc/pki: the host's certificates where libvirtd and QEMU look for them by default).
LIBVIRT_DIRS = (
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
    "/etc/pki",
)


def insecure() -> bool:
    """The lab runs without TLS (`scripts/lab up --insecure`); read each time: a command may switch it."""
    return INSECURE_FILE.exists()


#: The lab's one-node Ceph (cephx; one monitor, one BlueStore OSD on a large sparse file outside its data
#: dir), in the root namespace on the bridge's address so that both hosts' namespaces reach it. ``ceph.py``.
CEPH_DIR = LAB_DIR / "ceph"
CEPH_ADDRESS = BRIDGE_ADDRESS
CEPH_MON_PORTS = (3300, 6789)  # msgr2, msgr1 (libvirt's <host port=...> names the second)
CEPH_POOL = "ksa"
CEPH_POOL2 = "ksa2"  # a second pool of the same cluster, the agents' second rbd storage (pool -> pool moves)
CEPH_USER = "ksalab"  # client.ksalab: `profile rbd` on CEPH_POOL; its key is the hosts' libvirt secret
#: The OSD's file, sparse: large, because a full BlueStore OSD crashes and a mirror onto it hangs silently.
CEPH_OSD_BYTES = 32 << 30

#: Block storage: a directory per host of symlinks to loop devices (as an LVM volume group's /dev/VG holds
#: symlinks to its logical volumes); each device is a sparse file. ``blockdevs.py``.
BLOCK_ROOT = "blk"  # its name among the host's storage roots (kind block in agent.toml)
BLOCK_DEVICES = 3
BLOCK_DEVICE_MIB = 1088  # a 1 GiB guest disk as raw or qcow2 (qemu-img measure), with room to spare

# name -> (kind, size in MiB): "dir" roots are plain directories, the small tmpfs is for out-of-space tests.
STORAGE_ROOTS: tuple[tuple[str, str, int], ...] = (
    ("ps1", "dir", 0),
    ("ps2", "dir", 0),
    ("small", "tmpfs", 64),
)


@dataclass(frozen=True)
class HostSpec:
    """One lab hypervisor: everything about it that does not change between `up`s."""

    name: str
    address: str

    @property
    def netns(self) -> str:
        return f"{self.name}{SUFFIX}"

    @property
    def veth(self) -> str:
        """The root-namespace end of the host's veth pair (the one `link down` cuts)."""
        return f"ksa{SUFFIX}-{self.name}"

    @property
    def dir(self) -> Path:
        return LAB_DIR / self.name

    @property
    def libvirt_uri(self) -> str:
        """For `virsh -c` from the root namespace: over TLS with the operator's certificate."""
        if insecure():
            return f"qemu+tcp://{self.address}/system"
        return f"qemu+tls://{self.address}/system?pkipath={OPERATOR_PKI}"

    @property
    def agent_url(self) -> str:
        return f"{'http' if insecure() else 'https'}://{self.address}:{AGENT_PORT}"

    @property
    def holder_socket(self) -> Path:
        return self.dir / "holder.sock"

    @property
    def agent_config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def ceph_keyring(self) -> Path:
        """The lab client's keyring for this host's agent (its rbd storages' ``keyring``)."""
        return self.dir / f"ceph.client.{CEPH_USER}.keyring"

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    @property
    def agent_pid_file(self) -> Path:
        return self.dir / "agent.pid"

    @property
    def agent_state_dir(self) -> Path:
        return self.dir / "state"

    def storage_path(self, root: str) -> Path:
        return self.dir / "storage" / root

    @property
    def block_root(self) -> Path:
        """The directory of the host's block devices (symlinks to loop devices)."""
        return self.storage_path(BLOCK_ROOT)

    @property
    def loop_dir(self) -> Path:
        """The loop devices' backing files."""
        return self.dir / "loop"

    def private_dir(self, system_path: str) -> Path:
        """Source of the bind mount for one of LIBVIRT_DIRS (the capability cache survives `down`)."""
        if system_path == "/var/cache/libvirt":
            return CACHE_DIR / "libvirt-cache" / self.netns
        return self.dir / "root" / system_path.strip("/")


HOSTS: tuple[HostSpec, ...] = (
    HostSpec("hostA", f"10.213.{INSTANCE}.11"),
    HostSpec("hostB", f"10.213.{INSTANCE}.12"),
)


def host_by_name(name: str) -> HostSpec:
    for host in HOSTS:
        if host.name == name:
            return host
    raise KeyError(f"no lab host named {name!r} (known: {', '.join(h.name for h in HOSTS)})")
