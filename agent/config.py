"""The agent's one typed config object, read once from ``agent.toml`` (tomllib).

A bad config stops the service at start with a message naming the key (``ConfigError``).
"""

from __future__ import annotations

import re
import tomllib
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    IPvAnyNetwork,
    Tag,
    ValidationError,
    field_validator,
)


class ConfigError(Exception):
    """The config file is missing, unreadable or names a bad value; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageKind(StrEnum):
    """What a primary storage is: a directory of image files, a Ceph RBD pool, or a directory of block
    devices (one device per volume: loop devices, an LVM volume group's /dev/VG)."""

    FILE = "file"
    RBD = "rbd"
    BLOCK = "block"


#: Ceph names as the agent accepts them (pools, namespaces, cephx ids, images): no '/' or '@' (they
#: separate pool, namespace, image and snapshot), no leading dot, no spaces.
CEPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def ceph_name(value: str, what: str) -> str:
    if not CEPH_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a {what} name (letters, digits, '_', '.', '-'; at most 128)")
    return value


class _Storage(_Strict):
    uuid: str

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return _normalise_uuid(value)


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class FileStorageConfig(_Storage):
    """A directory of image files (qcow2, raw): the kind when ``kind`` is left out."""

    kind: Literal[StorageKind.FILE] = StorageKind.FILE
    path: AbsolutePath


class BlockStorageConfig(_Storage):
    """A directory whose entries are block devices (or symlinks to them), one per volume."""

    kind: Literal[StorageKind.BLOCK]
    path: AbsolutePath


class RbdStorageConfig(_Storage):
    """A Ceph RBD pool (and namespace), reached through ``monitors`` as the cephx ``user`` whose key is the
    value of the libvirt secret ``secret_uuid`` (usage type ceph) on every host that uses the pool."""

    kind: Literal[StorageKind.RBD]
    pool: str
    namespace: str = ""
    monitors: tuple[str, ...] = Field(min_length=1)
    user: str
    secret_uuid: str
    #: A Ceph keyring holding ``user``'s key (root's, mode 0600), for what the agent does itself where no QEMU
    #: runs: a stopped VM's copy onto or off the pool, and a chain kept as RBD snapshots. Without it those
    #: are refused (or the chain flattened, and said so); a running VM's moves need only the libvirt secret.
    keyring: AbsolutePath | None = None

    @field_validator("pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        return ceph_name(value, "pool")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return value and ceph_name(value, "namespace")

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if value.startswith("client."):
            raise ValueError("the cephx id without 'client.' (libvirt's <auth username=...>)")
        return ceph_name(value, "cephx user")

    @field_validator("secret_uuid")
    @classmethod
    def _secret_uuid(cls, value: str) -> str:
        return _normalise_uuid(value)

    @field_validator("monitors")
    @classmethod
    def _monitors(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for monitor in value:
            _monitor_address(monitor)
        return value

    def monitor_hosts(self) -> list[tuple[str, int]]:
        """(host, port) of each monitor, port 6789 (msgr1, what libvirt's <host> speaks) when not given."""
        return [_monitor_address(m) for m in self.monitors]


def _monitor_address(monitor: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([A-Za-z0-9.-]+)(?::(\d+))?", monitor)
    if match is None:
        raise ValueError(f"monitor {monitor!r} is not host, host:port or [ipv6]:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 6789)
    if not 0 < port < 65536:
        raise ValueError(f"monitor {monitor!r}: port out of range")
    return host, port


def _storage_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", StorageKind.FILE))
    return str(getattr(value, "kind", StorageKind.FILE))


StorageConfig = Annotated[
    Annotated[FileStorageConfig, Tag(StorageKind.FILE)]
    | Annotated[RbdStorageConfig, Tag(StorageKind.RBD)]
    | Annotated[BlockStorageConfig, Tag(StorageKind.BLOCK)],
    Discriminator(_storage_kind),
]


class LimitsConfig(_Strict):
    outgoing_migrations: int = Field(default=2, ge=1, le=64)
    incoming_migrations: int = Field(default=2, ge=1, le=64)
    #: Layer exports (a qemu-storage-daemon and a port each) open at once for incoming migrations.
    incoming_exports: int = Field(default=2, ge=1, le=64)
    #: MiB/s that every running move to another host together may put on the migration link, outgoing
    #: (0: no host-wide budget; each task keeps its own cap). ``PATCH /v1/host/budget`` changes it live.
    host_bandwidth: int = Field(default=0, ge=0, le=1_000_000)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)


class ReportConfig(_Strict):
    progress_interval_s: float = Field(default=1.0, gt=0)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    #: A final report is given up after this long or this many attempts, whichever comes first (the task's
    #: result stays in GET /v1/tasks/{id} either way).
    retry_for_s: float = Field(default=24 * 3600.0, gt=0)
    retry_max_attempts: int = Field(default=1500, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)
    #: Where callbackUrl and progressUrl may point, beside the address each request came from
    #: (agent/report/destinations.py); the ZStack dialect's allowed_networks are added to it.
    allowed_networks: tuple[IPvAnyNetwork, ...] = ()


class ZStackConfig(_Strict):
    """The ZStack agent dialect (``agent.zstack``, docs/zstack.md): off unless enabled; its paths carry no
    token, so they answer only clients whose source address is in ``allowed_networks`` (empty: nobody)."""

    enabled: bool = False
    allowed_networks: tuple[IPvAnyNetwork, ...] = ()
    #: Commands taken and not yet answered; more are refused with 429 and Retry-After.
    max_open_commands: int = Field(default=64, ge=1)
    #: Command records kept in all (answered ones go first, oldest first): each holds a callback.
    max_records: int = Field(default=4096, ge=16)


class AgentConfig(_Strict):
    listen_address: str = "0.0.0.0"
    port: int = Field(default=7070, ge=1, le=65535)
    #: The host's certificate and key (agent pki issue: /etc/pki/libvirt/servercert.pem and
    #: /etc/pki/libvirt/private/serverkey.pem) and the cluster CA (/etc/pki/CA/cacert.pem): the API is served
    #: over HTTPS with them, agent-to-agent calls present them and need a client certificate from the CA.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: Plain HTTP, qemu+tcp and unencrypted migration streams, as before the cluster PKI: only on request.
    insecure_transport: bool = False
    token_file: Path
    cluster_token_file: Path | None = None
    host_uuid: str
    libvirt_uri: str = "qemu:///system"
    state_dir: Path = Path("/var/lib/kvm-storage-agent")
    migration_address: str | None = None
    #: How other hosts' libvirtd reach this one for peer-to-peer migration (default qemu+tls://<address>/system,
    #: qemu+tcp:// with insecure_transport).
    peer_libvirt_uri: str | None = None
    shutdown_grace_s: float = Field(default=10.0, gt=0)
    storage: tuple[StorageConfig, ...] = ()
    limits: LimitsConfig = LimitsConfig()
    report: ReportConfig = ReportConfig()
    zstack: ZStackConfig = ZStackConfig()
    log_level: str = "INFO"

    @field_validator("host_uuid")
    @classmethod
    def _host_uuid(cls, value: str) -> str:
        return _normalise_uuid(value)

    @field_validator("storage")
    @classmethod
    def _distinct(cls, roots: tuple[StorageConfig, ...]) -> tuple[StorageConfig, ...]:
        seen: set[str] = set()
        for root in roots:
            if root.uuid in seen:
                raise ValueError(f"storage uuid {root.uuid} is listed twice")
            seen.add(root.uuid)
        return roots

    def migration_host(self) -> str:
        """The address migration and image-transfer traffic comes to on this host."""
        return self.migration_address or self.listen_address

    def peer_uri(self) -> str:
        transport = "tcp" if self.insecure_transport else "tls"
        return self.peer_libvirt_uri or f"qemu+{transport}://{self.migration_host()}/system"

    def check_transport(self) -> None:
        """At start: TLS material complete and readable, unless ``insecure_transport`` asks for plain text."""
        given = {
            k: getattr(self, k) for k in ("tls_cert", "tls_key", "tls_ca") if getattr(self, k) is not None
        }
        if self.insecure_transport and not given:
            return
        for key in ("tls_cert", "tls_key", "tls_ca"):
            if key not in given:
                if self.insecure_transport and key == "tls_ca":
                    continue  # HTTPS served, no cluster: the old optional TLS
                raise ConfigError(
                    f"{key}: missing; the agent serves and calls other agents over TLS only "
                    "(agent pki issue makes the files), or set insecure_transport = true for plain text"
                )
            path = given[key]
            if not path.is_file():
                raise ConfigError(f"{key}: {path} is not a readable file")

    def report_networks(self) -> tuple[Any, ...]:
        """Where reports may go beside each request's own address: ``[report] allowed_networks``, and the
        ZStack dialect's networks when it is on (its management servers call from there)."""
        zstack = self.zstack.allowed_networks if self.zstack.enabled else ()
        return (*self.report.allowed_networks, *zstack)

    def read_token(self) -> str:
        return read_secret(self.token_file, "token_file")

    def read_cluster_token(self) -> str | None:
        if self.cluster_token_file is None:
            return None
        return read_secret(self.cluster_token_file, "cluster_token_file")


def _normalise_uuid(value: str) -> str:
    """Accept dashed or 32-hex uuids (ZStack sends the latter); keep the 32-hex form out of the way."""
    try:
        return str(uuid.UUID(value))
    except ValueError as err:
        raise ValueError(f"{value!r} is not a uuid") from err


def read_secret(path: Path, key: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror}") from err
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return text


def parse_config(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        # A storage entry's location carries its kind's tag (storage.1.rbd.pool): the kind is said already.
        key = ".".join(str(part) for part in first["loc"] if part not in set(StorageKind)) or "<root>"
        raise ConfigError(f"{source}: {key}: {first['msg']}") from err


def load_config(path: Path) -> AgentConfig:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return parse_config(data, str(path))
