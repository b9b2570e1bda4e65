"""The lab's fixed shape: names, addresses and paths that tests, the agent config and humans rely on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
AGENT_BIN = VENV_BIN / "kvm-storage-agent"

LAB_DIR = Path("/var/lib/ksa-lab")
CACHE_DIR = Path("/var/cache/ksa-lab")
STATE_FILE = LAB_DIR / "lab.json"
TOKEN_FILE = LAB_DIR / "token"
GUESTS_DIR = LAB_DIR / "guests"
TMP_DIR = LAB_DIR / "tmp"
# The lock lives in the cache dir because `down` deletes LAB_DIR while holding it.
LOCK_FILE = CACHE_DIR / "lab.lock"

BRIDGE = "ksabr0"
BRIDGE_ADDRESS = "10.213.0.1"
PREFIX_LEN = 24
AGENT_PORT = 7070
LIBVIRT_TCP_PORT = 16509

# Directories every host gets its own copy of, bind-mounted over the system path inside its mount namespace.
LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")

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
        return self.name

    @property
    def veth(self) -> str:
        """The root-namespace end of the host's veth pair (the one `link down` cuts)."""
        return f"ksa-{self.name}"

    @property
    def dir(self) -> Path:
        return LAB_DIR / self.name

    @property
    def libvirt_uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def agent_url(self) -> str:
        return f"http://{self.address}:{AGENT_PORT}"

    @property
    def holder_socket(self) -> Path:
        return self.dir / "holder.sock"

    @property
    def agent_config(self) -> Path:
        return self.dir / "agent.toml"

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

    def private_dir(self, system_path: str) -> Path:
        """Source of the bind mount for one of LIBVIRT_DIRS (the capability cache survives `down`)."""
        if system_path == "/var/cache/libvirt":
            return CACHE_DIR / "libvirt-cache" / self.name
        return self.dir / "root" / system_path.strip("/")


HOSTS: tuple[HostSpec, ...] = (HostSpec("hostA", "10.213.0.11"), HostSpec("hostB", "10.213.0.12"))


def host_by_name(name: str) -> HostSpec:
    for host in HOSTS:
        if host.name == name:
            return host
    raise KeyError(f"no lab host named {name!r} (known: {', '.join(h.name for h in HOSTS)})")
