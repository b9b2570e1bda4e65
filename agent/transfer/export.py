"""Destination side of a layer transfer: create the target layer and export it writable over NBD.

``IncomingLayer.prepare`` creates the image (qcow2 with the final virtual size and its backing pointer
already naming the destination's copy of the layer below, or raw), opens it writable in its own
``qemu-storage-daemon`` with the backing chain attached read-only, and exports it over NBD on the
destination's migration address only, on a port the agent picks. ``finish`` closes everything and keeps the
file; ``abort`` closes everything and removes it.

Why the backing is attached: a write smaller than a destination cluster (the source has smaller clusters
than the destination, or a copy chunk lands in a larger cluster) makes qcow2 fill the rest of the cluster
from the backing file; with no backing attached it fills zeros, and those zeros then mask the lower layer.
Measured (QEMU 7.2): a 4 KiB-cluster layer sent into a 64 KiB-cluster destination compares identical with the
backing attached and differs without it. Likewise qcow2 records a discard of an unallocated cluster as a
zero cluster only when a backing exists. (Write-zeroes alone set qcow2 v3's zero flag either way.)

Protection of the export: TLS-PSK, with a fresh random key per transfer, plus an unguessable export name,
both handed to the source agent only over the authenticated agent API. Measured on QEMU 7.2: the NBD server
answers ``NBD_OPT_LIST`` to any client that connects, with every export's name (``qemu-nbd -L`` shows it).
So a secret export name alone protects nothing against anyone who can reach the port while it is open: they
list the name, then write to the layer. Under TLS the server refuses every option but STARTTLS, so without
the key nobody lists, reads or writes. The random name still matters: a source can only ever write into
the export meant for it, never into a stale or foreign daemon that happens to hold the same port.
The price is CPU: for 2 GiB over loopback, all processes together used 6.2 s with TLS-PSK (AES-128-GCM, see
``endpoint.TLS_PRIORITY``) against 3.0 s plain. Plain NBD (``tls=False``) remains for tests and benchmarks.
Further limits in both modes: the server listens on the given address only (never a wildcard), accepts one
client at a time, and exists only between ``prepare`` and ``finish``/``abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import logging
import os
import random
import socket
from pathlib import Path
from typing import TypedDict, Unpack

from agent.errors import InvalidRequest, StorageError
from agent.storage import qemuimg
from agent.transfer.endpoint import NbdEndpoint, add_psk_credentials, new_export_name, new_psk
from agent.transfer.nodes import check_format
from agent.transfer.qsd import DaemonCommandFailed, StorageDaemon, finish_shielded

log = logging.getLogger(__name__)

PORT_ATTEMPTS = 20
NODE = "target"
EXPORT_ID = "incoming"


class IncomingState(enum.Enum):
    NEW = "new"
    EXPORTED = "exported"
    FINISHED = "finished"
    ABORTED = "aborted"


class LayerOptions(TypedDict, total=False):
    """``IncomingLayer``'s optional arguments, as ``prepare`` passes them on (defaults: the class's)."""

    backing: str | None
    backing_format: str | None
    cluster_size: int | None
    tls: bool
    ports: range | None
    runtime_dir: str | None


class IncomingLayer:
    """One destination layer open for writing over NBD; build it with ``await IncomingLayer.prepare(...)``."""

    def __init__(
        self,
        path: str,
        fmt: str,
        virtual_size: int,
        *,
        listen_host: str,
        backing: str | None = None,
        backing_format: str | None = None,
        cluster_size: int | None = None,
        tls: bool = True,
        ports: range | None = None,
        runtime_dir: str | None = None,
    ) -> None:
        check_format(fmt, path)
        if fmt == "raw" and backing is not None:
            raise InvalidRequest(f"{path}: a raw layer cannot have a backing file", field="backing")
        _check_listen_host(listen_host)
        self.path = path
        self.format = fmt
        self.virtual_size = virtual_size
        self.backing = backing
        self.backing_format = backing_format or ("qcow2" if backing else None)
        self.cluster_size = cluster_size
        self.listen_host = listen_host
        self._tls = tls
        self._ports = ports
        self._daemon = StorageDaemon(f"incoming:{Path(path).name}", runtime_dir=runtime_dir)
        self._endpoint: NbdEndpoint | None = None
        self._created = False
        self.state = IncomingState.NEW

    @classmethod
    async def prepare(
        cls, path: str, fmt: str, virtual_size: int, *, listen_host: str, **options: Unpack[LayerOptions]
    ) -> IncomingLayer:
        """Create ``path`` (it must not exist yet) and export it; on any failure nothing is left behind.

        ``path`` and ``backing`` must already be confined to a storage root by the caller.
        """
        layer = cls(path, fmt, virtual_size, listen_host=listen_host, **options)
        try:
            await layer._prepare()
        except BaseException:
            await layer.abort()
            raise
        return layer

    @property
    def endpoint(self) -> NbdEndpoint:
        """What the source needs to connect (secret: hand it over the authenticated agent API only)."""
        if self._endpoint is None or self.state is not IncomingState.EXPORTED:
            raise StorageError(f"{self.path} is not exported (state {self.state.value})")
        return self._endpoint

    @property
    def daemon_pid(self) -> int | None:
        return self._daemon.pid

    async def finish(self, timeout_s: float = 600.0) -> None:
        """The copy is complete: remove the export, stop the server, flush and close the image, keep it.

        ``timeout_s`` bounds the flush (all the layer's dirty pages reach the disk here); past it the
        daemon is killed and the layer does not count as finished.
        """
        if self.state is IncomingState.FINISHED:
            return
        if self.state is not IncomingState.EXPORTED:
            raise StorageError(f"cannot finish {self.path}: it is {self.state.value}")
        alive = self._daemon.running
        try:
            await finish_shielded(self._close(timeout_s))
        except TimeoutError as err:
            raise StorageError(
                f"flushing and closing {self.path} took longer than {timeout_s:.0f} s"
            ) from err
        if not alive:
            raise StorageError(
                f"the storage daemon exporting {self.path} died before the layer was finished",
                details="the image may miss writes; abort it and send the layer again",
            )
        self.state = IncomingState.FINISHED
        log.info("incoming layer %s finished", self.path)

    async def abort(self) -> None:
        """Tear everything down (quit, else kill) and remove the target file if we created it. Idempotent."""
        if self.state is IncomingState.ABORTED:
            return
        self.state = IncomingState.ABORTED
        try:
            await self._daemon.stop()
        finally:
            if self._created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                self._created = False
                log.info("incoming layer %s aborted, file removed", self.path)

    async def _prepare(self) -> None:
        await self._create_image()
        await self._daemon.start()
        await self._open_target()
        tls_id = await add_psk_credentials(self._daemon, psk, "server") if (psk := self._new_psk()) else None
        port = await self._start_server(tls_id)
        name = new_export_name()
        await self._daemon.execute(
            "block-export-add",
            {"type": "nbd", "id": EXPORT_ID, "node-name": NODE, "name": name, "writable": True},
        )
        self._endpoint = NbdEndpoint(self.listen_host, port, name, psk)
        self.state = IncomingState.EXPORTED
        log.info(
            "incoming layer %s exported on %s port %d (%s)",
            self.path,
            self.listen_host,
            port,
            "TLS-PSK" if psk else "plain NBD",
        )

    def _new_psk(self) -> str | None:
        return new_psk() if self._tls else None

    async def _create_image(self) -> None:
        # Reserve the name first: qemu-img create would silently truncate an existing image.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise StorageError(
                f"{self.path} already exists", details="the destination layer must not exist yet"
            ) from None
        except OSError as err:
            raise StorageError(f"cannot create {self.path}: {err.strerror}") from err
        os.close(fd)
        self._created = True
        args = [qemuimg.QEMU_IMG, "create", "-q", "-f", self.format]
        if self.backing is not None:
            args += ["-b", self.backing, "-F", self.backing_format or "qcow2"]
        if self.format == "qcow2" and self.cluster_size:
            args += ["-o", f"cluster_size={self.cluster_size}"]
        await qemuimg.run(*args, self.path, str(self.virtual_size), limit_s=60)

    async def _open_target(self) -> None:
        # The backing chain is opened from the header we just wrote: read-only, as QEMU opens backing files.
        await self._daemon.execute(
            "blockdev-add",
            {"driver": self.format, "node-name": NODE, "file": {"driver": "file", "filename": self.path}},
        )

    async def _start_server(self, tls_id: str | None) -> int:
        last: DaemonCommandFailed | None = None
        for _ in range(PORT_ATTEMPTS):
            port = self._candidate_port()
            args: dict[str, object] = {
                "addr": {"type": "inet", "data": {"host": self.listen_host, "port": str(port)}},
                "max-connections": 1,
            }
            if tls_id is not None:
                args["tls-creds"] = tls_id
            try:
                await self._daemon.execute("nbd-server-start", args)
                return port
            except DaemonCommandFailed as err:
                if os.strerror(errno.EADDRINUSE) not in err.qmp_desc:
                    raise
                last = err
                log.info("port %d on %s is taken, trying another", port, self.listen_host)
        raise StorageError(
            f"no free port for the NBD export of {self.path} on {self.listen_host}",
            details=f"{PORT_ATTEMPTS} attempts",
        ) from last

    def _candidate_port(self) -> int:
        if self._ports is not None:
            return random.choice(self._ports)
        family = socket.AF_INET6 if ipaddress.ip_address(self.listen_host).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((self.listen_host, 0))
            return int(probe.getsockname()[1])

    async def _close(self, timeout_s: float) -> None:
        try:
            if self._daemon.running:
                async with asyncio.timeout(timeout_s):
                    # Explicit steps, so the image is flushed and closed before we call it finished.
                    with contextlib.suppress(DaemonCommandFailed):
                        await self._daemon.execute("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
                    with contextlib.suppress(DaemonCommandFailed):
                        await self._daemon.execute("nbd-server-stop")
                    await self._flush_and_close()
        finally:
            await self._daemon.stop()

    async def _flush_and_close(self) -> None:
        """Close the node so the image is flushed to disk before we report it finished."""
        try:
            await self._daemon.execute("blockdev-del", {"node-name": NODE})
        except DaemonCommandFailed as err:
            # The export may still be going away (block-export-del returns before it is deleted).
            if "in use" not in err.qmp_desc and "is busy" not in err.qmp_desc:
                raise
            with self._daemon.listen("BLOCK_EXPORT_DELETED") as listener:
                exports = await self._daemon.execute("query-block-exports")
                if exports:
                    await self._daemon.next_event(listener)
            await self._daemon.execute("blockdev-del", {"node-name": NODE})


def _check_listen_host(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidRequest(
            f"{host} is not an IP address",
            field="migrationAddress",
            details="the NBD export listens on one address",
        ) from None
    if address.is_unspecified:
        raise InvalidRequest(
            f"refusing to listen on the wildcard address {host}",
            field="migrationAddress",
            details="the NBD export listens only on the host's migration address",
        )
