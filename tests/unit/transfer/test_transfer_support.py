"""Helpers for the transfer tests (no tests here): image chains built with qemu-io, daemons, ports."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from agent.storage import qemuimg
from agent.transfer.export import IncomingLayer
from agent.transfer.send import send_layer_to
from agent.transfer.verify import LayerDigest, layer_digest, verify_layer

MiB = 1024 * 1024
LOOPBACK = "127.0.0.1"

#: The real tools are needed; a missing one fails the test (``qemu_tools`` in conftest.py), never skips it.
needs_qemu = pytest.mark.usefixtures("qemu_tools")


def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, path], check=True, stdout=subprocess.DEVNULL)


def create(
    path: Path, size: int, backing: Path | None = None, fmt: str = "qcow2", cluster_size: int | None = None
) -> str:
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    if cluster_size is not None:
        args += ["-o", f"cluster_size={cluster_size}"]
    subprocess.run([*args, str(path), str(size)], check=True)
    return str(path)


def make_chain(root: Path, size: int = 64 * MiB) -> list[str]:
    """base <- mid <- top, each with data; mid and top zero ranges that mask data below. Top first."""
    root.mkdir(parents=True, exist_ok=True)
    base = create(root / "base.qcow2", size)
    qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 16M 8M", "write -P 0x13 40M 8M")
    mid = create(root / "mid.qcow2", size, Path(base))
    qemu_io(mid, "write -P 0x21 4M 2M", "write -z 16M 4M", "write -P 0x22 56M 4M")
    top = create(root / "top.qcow2", size, Path(mid))
    qemu_io(top, "write -P 0x31 0 1M", "write -z 40M 4M", "write -P 0x32 20M 2M", "write -P 0x33 63M 64k")
    return [top, mid, base]


def qsd_children() -> list[psutil.Process]:
    """qemu-storage-daemon processes below this test process (setpriv execs into the daemon)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("qemu-storage"):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def port_closed(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


async def transfer_layer(
    src: str,
    dst: str,
    backing_dst: str | None,
    *,
    rate: Callable[[], int | None] = lambda: None,
    tls: bool = True,
    progress: list[tuple[int, int]] | None = None,
) -> tuple[LayerDigest, int]:
    """The whole protocol for one layer on loopback: prepare, send, finish, verify. Returns (digest, port)."""
    info = await qemuimg.info(src)
    incoming = await IncomingLayer.prepare(
        dst,
        info.format,
        info.virtual_size,
        listen_host=LOOPBACK,
        backing=backing_dst,
        backing_format="qcow2" if backing_dst else None,
        cluster_size=info.cluster_size,
        tls=tls,
    )
    try:
        port = incoming.endpoint.port
        await send_layer_to(
            src,
            info.format,
            incoming.endpoint,
            rate=rate,
            on_progress=(lambda d, t: progress.append((d, t))) if progress is not None else None,
        )
        await incoming.finish()
        source_digest = await layer_digest(src, info.format)
        digest = await verify_layer(
            dst,
            info.format,
            source_digest,
            backing=backing_dst,
            backing_format="qcow2" if backing_dst else None,
        )
    except BaseException:
        await incoming.abort()
        raise
    return digest, port
