"""What protects and checks a transfer: TLS-PSK, the export name, locks, ports, the digest, cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest
from test_transfer_support import (
    LOOPBACK,
    MiB,
    create,
    needs_qemu,
    port_closed,
    qemu_io,
    qsd_children,
    transfer_layer,
)

from agent.errors import StorageError
from agent.storage import qemuimg
from agent.transfer.endpoint import NbdEndpoint
from agent.transfer.export import IncomingLayer
from agent.transfer.qsd import StorageDaemon
from agent.transfer.send import TransferFailed, send_layer_to
from agent.transfer.verify import layer_digest, verify_layer

pytestmark = needs_qemu


def _layer(tmp_path: Path, name: str = "src.qcow2") -> str:
    path = create(tmp_path / name, 16 * MiB)
    qemu_io(path, "write -P 0x61 0 2M", "write -z 4M 1M", "write -P 0x62 8M 64k")
    return path


async def _qemu_nbd_list(port: int) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-nbd", "-L", "-b", LOOPBACK, "-p", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.parametrize("tls", [False, True])
async def test_a_plain_export_lists_its_name_a_tls_export_does_not(tmp_path: Path, tls: bool) -> None:
    """Why TLS-PSK: QEMU's NBD server tells any client every export name (NBD_OPT_LIST)."""
    incoming = await IncomingLayer.prepare(
        str(tmp_path / "dst.qcow2"), "qcow2", MiB, listen_host=LOOPBACK, tls=tls
    )
    try:
        rc, out = await _qemu_nbd_list(incoming.endpoint.port)
        if tls:
            assert rc != 0
            assert incoming.endpoint.export_name not in out
        else:
            assert rc == 0
            assert incoming.endpoint.export_name in out  # a secret name alone is no secret
    finally:
        await incoming.abort()


async def test_a_wrong_key_or_name_cannot_write(tmp_path: Path) -> None:
    src = _layer(tmp_path)
    incoming = await IncomingLayer.prepare(
        str(tmp_path / "dst.qcow2"), "qcow2", 16 * MiB, listen_host=LOOPBACK
    )
    try:
        ep = incoming.endpoint
        assert ep.psk is not None
        wrong_key = NbdEndpoint(ep.host, ep.port, ep.export_name, "00" * 32)
        wrong_name = NbdEndpoint(ep.host, ep.port, "guess", ep.psk)
        for endpoint in (wrong_key, wrong_name):
            with pytest.raises(TransferFailed, match="cannot open the destination export"):
                await send_layer_to(src, "qcow2", endpoint, rate=lambda: None)
        # The real one still works afterwards.
        await send_layer_to(src, "qcow2", ep, rate=lambda: None)
    finally:
        await incoming.abort()
    assert not qsd_children()


def test_endpoint_secrets_stay_out_of_repr() -> None:
    ep = NbdEndpoint("10.213.0.2", 50000, "the-export-name", "the-key")
    assert "the-export-name" not in repr(ep) and "the-key" not in repr(ep)
    assert NbdEndpoint.from_dict(ep.to_dict()) == ep


async def test_a_layer_open_for_writing_is_refused(tmp_path: Path) -> None:
    src = _layer(tmp_path)
    incoming = await IncomingLayer.prepare(
        str(tmp_path / "dst.qcow2"), "qcow2", 16 * MiB, listen_host=LOOPBACK
    )
    try:
        async with StorageDaemon("vm") as vm:  # stands in for a running VM with the layer as its active disk
            await vm.execute(
                "blockdev-add",
                {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": src}},
            )
            with pytest.raises(TransferFailed, match="open for writing by another process"):
                await send_layer_to(src, "qcow2", incoming.endpoint, rate=lambda: None)
            # Explicitly allowed, it copies (the caller vouches that nobody writes meanwhile).
            await send_layer_to(src, "qcow2", incoming.endpoint, rate=lambda: None, force_share=True)
    finally:
        await incoming.abort()


async def test_lower_layers_held_read_only_by_a_vm_can_be_sent(tmp_path: Path) -> None:
    base = _layer(tmp_path, "base.qcow2")
    top = create(tmp_path / "top.qcow2", 16 * MiB, Path(base))
    dst = str(tmp_path / "dst-base.qcow2")
    async with StorageDaemon("vm") as vm:
        await vm.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": top}},
        )
        await transfer_layer(base, dst, None)
    assert await qemuimg.compare(base, dst)


def _busy_port_with_a_free_neighbour() -> socket.socket:
    """A listening socket on a port whose next port is free (tried a few times: the machine is shared)."""
    for _ in range(50):
        busy = socket.socket()
        busy.bind((LOOPBACK, 0))
        port = busy.getsockname()[1]
        with socket.socket() as neighbour:
            try:
                neighbour.bind((LOOPBACK, port + 1))
            except OSError:
                busy.close()
                continue
        busy.listen(1)
        return busy
    raise AssertionError("no free pair of adjacent loopback ports in 50 tries")


async def test_busy_ports_are_skipped(tmp_path: Path) -> None:
    with _busy_port_with_a_free_neighbour() as busy:
        taken = busy.getsockname()[1]
        incoming = await IncomingLayer.prepare(
            str(tmp_path / "dst.qcow2"), "qcow2", MiB, listen_host=LOOPBACK, ports=range(taken, taken + 2)
        )
        try:
            assert incoming.endpoint.port == taken + 1
        finally:
            await incoming.abort()
        with pytest.raises(StorageError, match="no free port"):
            await IncomingLayer.prepare(
                str(tmp_path / "dst2.qcow2"),
                "qcow2",
                MiB,
                listen_host=LOOPBACK,
                ports=range(taken, taken + 1),
            )
    assert not os.path.exists(tmp_path / "dst2.qcow2")
    assert not qsd_children()


async def test_an_existing_destination_is_never_overwritten(tmp_path: Path) -> None:
    existing = _layer(tmp_path, "dst.qcow2")
    before = Path(existing).read_bytes()
    with pytest.raises(StorageError, match="already exists"):
        await IncomingLayer.prepare(existing, "qcow2", 16 * MiB, listen_host=LOOPBACK)
    assert Path(existing).read_bytes() == before
    assert not qsd_children()


async def test_a_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "dst.qcow2"
    with pytest.raises(StorageError):
        await IncomingLayer.prepare(
            str(dst), "qcow2", MiB, listen_host=LOOPBACK, backing=str(tmp_path / "missing.qcow2")
        )
    assert not dst.exists()
    assert not qsd_children()


async def test_a_wrong_size_is_refused_before_copying(tmp_path: Path) -> None:
    src = _layer(tmp_path)
    incoming = await IncomingLayer.prepare(
        str(tmp_path / "dst.qcow2"), "qcow2", 8 * MiB, listen_host=LOOPBACK
    )
    try:
        with pytest.raises(TransferFailed, match="has 8388608 bytes"):
            await send_layer_to(src, "qcow2", incoming.endpoint, rate=lambda: None)
    finally:
        await incoming.abort()
    assert not qsd_children()


async def test_the_export_is_gone_after_finish(tmp_path: Path) -> None:
    src = _layer(tmp_path)
    dst = str(tmp_path / "dst.qcow2")
    _digest, port = await transfer_layer(src, dst, None)
    assert port_closed(LOOPBACK, port)
    assert os.path.exists(dst)
    assert not qsd_children()


async def test_digest_sees_content_allocation_and_backing(tmp_path: Path) -> None:
    src = _layer(tmp_path)
    dst = str(tmp_path / "dst.qcow2")
    await transfer_layer(src, dst, None)
    expected = await layer_digest(src, "qcow2")
    assert (await verify_layer(dst, "qcow2", expected, backing=None)) == expected

    qemu_io(dst, "write -P 0x63 8M 512")  # one sector of different data
    with pytest.raises(StorageError, match="differs from its source layer"):
        await verify_layer(dst, "qcow2", expected, backing=None)

    other = str(tmp_path / "other.qcow2")
    await transfer_layer(src, other, None)
    qemu_io(other, "write -z 12M 64k")  # zeroes where the source leaves it to the backing: masks it
    with pytest.raises(StorageError, match="differs from its source layer"):
        await verify_layer(other, "qcow2", expected, backing=None)

    with pytest.raises(StorageError, match="expected /nowhere"):
        await verify_layer(dst, "qcow2", expected, backing="/nowhere")


async def test_digest_does_not_care_how_zeroes_are_stored(tmp_path: Path) -> None:
    as_zero_cluster = create(tmp_path / "a.qcow2", 16 * MiB)
    qemu_io(as_zero_cluster, "write -P 1 0 1M", "write -z 1M 3M")
    as_zero_data = create(tmp_path / "b.qcow2", 16 * MiB)
    qemu_io(as_zero_data, "write -P 1 0 1M", "write -P 0 1M 3M")
    a = await layer_digest(as_zero_cluster, "qcow2")
    b = await layer_digest(as_zero_data, "qcow2")
    assert a == b
    assert a.data_read == MiB and b.data_read == 4 * MiB


async def test_abort_of_a_frozen_export_kills_it(tmp_path: Path) -> None:
    dst = tmp_path / "dst.qcow2"
    incoming = await IncomingLayer.prepare(str(dst), "qcow2", MiB, listen_host=LOOPBACK)
    assert incoming.daemon_pid is not None
    os.kill(incoming.daemon_pid, signal.SIGSTOP)
    async with asyncio.timeout(15):
        await incoming.abort()
    assert not dst.exists()
    assert not qsd_children()
