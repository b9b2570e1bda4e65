"""The agent's own access to an RBD pool, for what it does where no QEMU of a guest runs: a stopped VM's copy
onto or off the pool, and the lower layers of a chain written into an image and kept as RBD snapshots.

A running VM's moves never need this: its QEMU reaches the pool through the libvirt secret. These do, so the
pool's storage must name a Ceph keyring in ``agent.toml`` (``keyring``, root's, 0600). While a copy runs the
user's key is handed to QEMU tools as a secret object read from a 0600 file in a private directory (never on
a command line); the ``rbd`` tool reads the keyring itself. Nothing else of Ceph's is needed on the host: no
``ceph.conf``, the monitors come from the storage.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import Code, PreflightFailed
from agent.storage import qemuimg
from agent.storage.locations import RbdImage
from agent.storage.rbdpool import RbdPool

#: The id of the secret object that carries a pool's key in QEMU tools and daemons (and the pool's uuid).
SECRET_ID = "ksa-rbd-key"
#: An RBD snapshot name: Ceph's image name rule (no ``@``, ``/`` or spaces).
_SNAP_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def snapshot_name(layer_path: str) -> str:
    """The snapshot that keeps a lower layer: the layer file's name without its extension (ZStack's and the
    lab's layers are named by volume or snapshot uuid), in Ceph's characters."""
    stem = Path(layer_path).name.split(".")[0] or Path(layer_path).name
    return _SNAP_BAD.sub("-", stem)[:96]


def read_key(keyring: str, user: str) -> str:
    """The base64 key of ``client.<user>`` in a Ceph keyring; refused naming the file when it cannot be read
    or holds no key for the user."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(keyring, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as err:
        raise PreflightFailed(
            f"cannot read the keyring {keyring}: {getattr(err, 'strerror', None) or err}",
            code=Code.CEPH_ACCESS,
            field="storage.keyring",
        ) from err
    section = f"client.{user}"
    key = parser.get(section, "key", fallback="").strip()
    if not key:
        raise PreflightFailed(
            f"the keyring {keyring} holds no key for {section}",
            code=Code.CEPH_ACCESS,
            field="storage.keyring",
        )
    return key


def needs_keyring(pool: RbdPool, what: str, field: str) -> PreflightFailed:
    """Why ``what`` is refused on a pool whose storage names no keyring."""
    return PreflightFailed(
        f"{what} needs the agent's own access to pool {pool.pool}: storage {pool.uuid} names no keyring",
        code=Code.STORAGE_KIND_UNSUPPORTED,
        field=field,
        details="set keyring (a Ceph keyring with the client's key, root's, 0600) in the storage's entry of "
        "agent.toml; a running VM's moves need only the libvirt secret",
    )


@dataclass(frozen=True)
class KeyedPool:
    """An RBD pool with the key at hand for QEMU tools and the ``rbd`` tool."""

    pool: RbdPool
    secret_file: Path

    @property
    def secret_id(self) -> str:
        """One per pool: a copy between two pools names both keys."""
        return f"{SECRET_ID}-{self.pool.uuid}"

    def qemu_objects(self) -> list[str]:
        """Command-line arguments of ``qemu-img`` that define the key's secret object."""
        return ["--object", f"secret,id={self.secret_id},file={self.secret_file},format=base64"]

    def secret_object(self) -> dict[str, Any]:
        """The same as a QMP ``object-add`` (qemu-storage-daemon)."""
        return {"qom-type": "secret", "id": self.secret_id, "file": str(self.secret_file), "format": "base64"}

    def node(self, image: RbdImage, *, snapshot: str | None = None) -> dict[str, Any]:
        """QEMU's ``rbd`` block node options for ``image`` (read-only at ``snapshot``), zeros written by
        unmapping."""
        node: dict[str, Any] = {
            "driver": "rbd",
            "pool": image.pool,
            "image": image.name,
            "user": self.pool.user,
            "server": [{"host": host, "port": str(port)} for host, port in self.pool.monitors],
            "key-secret": self.secret_id,
        }
        if image.namespace:
            node["namespace"] = image.namespace
        if snapshot is not None:
            node["snapshot"] = snapshot
        return node

    def image_json(self, image: RbdImage, *, snapshot: str | None = None) -> str:
        """A ``json:`` filename of the raw image for ``qemu-img`` (with ``qemu_objects``)."""
        return "json:" + json.dumps({"driver": "raw", "file": self.node(image, snapshot=snapshot)})

    async def rbd(self, *args: str, limit_s: float = 120) -> str:
        """Run ``rbd args`` as the pool's user (the command's words first: ``snap``, ``create``, the image;
        the access options after them); a failure is a ``StorageError`` with its stderr."""
        monitors = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.pool.monitors)
        assert self.pool.keyring is not None
        access = ["-c", "/dev/null", "-m", monitors, "--id", self.pool.user, "--keyring", self.pool.keyring]
        return await qemuimg.run(shutil.which("rbd") or "rbd", *args, *access, limit_s=limit_s)

    async def create_snapshot(self, image: RbdImage, name: str) -> None:
        await self.rbd("snap", "create", f"{image.spec}@{name}")

    async def snapshots(self, image: RbdImage) -> list[str]:
        """The image's snapshots, oldest first."""
        out = await self.rbd("snap", "ls", "--format", "json", image.spec)
        listed: list[Mapping[str, Any]] = json.loads(out)
        return [str(s["name"]) for s in sorted(listed, key=lambda s: int(s["id"]))]


@contextlib.asynccontextmanager
async def keyed(
    pool: RbdPool, what: str, *, field: str = "primaryStorageMigrateVm.dstPrimaryStorageUuid"
) -> AsyncIterator[KeyedPool]:
    """The pool with its key at hand for ``what`` (the refusal names it, and ``field``, when the storage has
    no keyring); the key's file is removed at the end."""
    if pool.keyring is None:
        raise needs_keyring(pool, what, field)
    key = await asyncio.to_thread(read_key, pool.keyring, pool.user)
    workdir = Path(tempfile.mkdtemp(prefix="ksa-rbdkey-"))  # 0700
    try:
        secret = workdir / "key"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        yield KeyedPool(pool, secret)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
