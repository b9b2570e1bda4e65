"""Layer transfer over real qemu-storage-daemon and NBD on loopback: chains, allocation, cleanup, rate."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_transfer_support import (
    LOOPBACK,
    MiB,
    create,
    make_chain,
    needs_qemu,
    port_closed,
    qemu_io,
    qsd_children,
    transfer_layer,
)

from agent.errors import InvalidRequest, StorageError
from agent.storage import qemuimg
from agent.transfer.export import IncomingLayer, IncomingState
from agent.transfer.send import TransferFailed, send_layer_to
from agent.transfer.verify import layer_extents

pytestmark = needs_qemu


async def test_three_layer_chain_arrives_layer_by_layer(tmp_path: Path) -> None:
    src = make_chain(tmp_path / "src")
    dst_dir = tmp_path / "dst"
    dst_dir.mkdir()
    dst = [str(dst_dir / Path(p).name) for p in src]
    ports = []
    for i in reversed(range(3)):  # base first
        below = dst[i + 1] if i + 1 < len(dst) else None
        _digest, port = await transfer_layer(src[i], dst[i], below)
        ports.append(port)

    for i, path in enumerate(dst):
        info = await qemuimg.info(path)
        assert info.format == "qcow2"
        assert info.virtual_size == 64 * MiB
        assert info.backing == (dst[i + 1] if i + 1 < len(dst) else None)
        # The layer alone allocates exactly what its source allocates, zeroed ranges as zeroed ranges.
        assert await layer_extents(path) == await layer_extents(src[i])
    assert await qemuimg.compare(src[0], dst[0])
    assert await qemuimg.compare(src[1], dst[1])
    assert not qsd_children()
    assert all(port_closed(LOOPBACK, port) for port in ports)


async def test_zeroed_range_masks_the_base_at_the_destination(tmp_path: Path) -> None:
    src = make_chain(tmp_path / "src")
    dst_dir = tmp_path / "dst"
    dst_dir.mkdir()
    base, mid = str(dst_dir / "base.qcow2"), str(dst_dir / "mid.qcow2")
    await transfer_layer(src[2], base, None, tls=False)
    await transfer_layer(src[1], mid, base, tls=False)
    zero = [e for e in await layer_extents(mid) if e.zero]
    assert [(e.start, e.length) for e in zero] == [(16 * MiB, 4 * MiB)]
    # Through the chain the base's 0x12 data is hidden by mid's zeroes.
    qemu_io(mid, "read -P 0 16M 4M", "read -P 0x12 20M 4M")


async def _incoming_for(src: str, dst: str, *, tls: bool = True) -> IncomingLayer:
    info = await qemuimg.info(src)
    return await IncomingLayer.prepare(
        dst, info.format, info.virtual_size, listen_host=LOOPBACK, cluster_size=info.cluster_size, tls=tls
    )


def _recorder(progress: list[tuple[int, int]], moving: asyncio.Event) -> Callable[[int, int], None]:
    """An on_progress that records and sets ``moving`` once bytes have moved."""

    def record(done: int, total: int) -> None:
        progress.append((done, total))
        if done > 0:
            moving.set()

    return record


def _big_layer(tmp_path: Path, data_mib: int, zero_mib: int = 0) -> str:
    path = create(tmp_path / "big.qcow2", (data_mib + zero_mib + 8) * MiB)
    commands = [f"write -P 0x5a 0 {data_mib}M"]
    if zero_mib:
        commands.append(f"write -z {data_mib}M {zero_mib}M")
    qemu_io(path, *commands)
    return path


async def test_cancel_mid_transfer_leaves_nothing(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 64)
    dst = str(tmp_path / "dst.qcow2")
    incoming = await _incoming_for(src, dst)
    port = incoming.endpoint.port
    progress: list[tuple[int, int]] = []
    moving = asyncio.Event()
    send = asyncio.create_task(
        send_layer_to(
            src,
            "qcow2",
            incoming.endpoint,
            rate=lambda: 8 * MiB,
            on_progress=_recorder(progress, moving),
        )
    )
    async with asyncio.timeout(30):
        await moving.wait()
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    await incoming.abort()
    assert not os.path.exists(dst)
    assert not qsd_children()
    assert port_closed(LOOPBACK, port)
    assert all(done < total for done, total in progress)


async def test_killed_source_daemon_fails_clearly_and_cleans_up(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 64)
    dst = str(tmp_path / "dst.qcow2")
    incoming = await _incoming_for(src, dst)
    port = incoming.endpoint.port
    progress: list[tuple[int, int]] = []
    moving = asyncio.Event()
    send = asyncio.create_task(
        send_layer_to(
            src,
            "qcow2",
            incoming.endpoint,
            rate=lambda: 8 * MiB,
            on_progress=_recorder(progress, moving),
        )
    )
    async with asyncio.timeout(30):
        await moving.wait()
    source = [p for p in qsd_children() if p.pid != incoming.daemon_pid]
    assert len(source) == 1
    os.kill(source[0].pid, signal.SIGKILL)
    with pytest.raises(TransferFailed) as failure:
        await send
    message = failure.value.description
    assert src in message and "SIGKILL" in message and "storage daemon" in message
    await incoming.abort()
    assert not os.path.exists(dst)
    assert not qsd_children()
    assert port_closed(LOOPBACK, port)


async def _timed_send(src: str, dst: str, rate: Callable[[], int | None]) -> float:
    incoming = await _incoming_for(src, dst)
    try:
        started = time.monotonic()
        await send_layer_to(src, "qcow2", incoming.endpoint, rate=rate)
        return time.monotonic() - started
    finally:
        await incoming.abort()


async def test_rate_limit_holds_and_follows_changes(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 64)
    capped = await _timed_send(src, str(tmp_path / "a.qcow2"), lambda: 32 * MiB)
    assert capped >= 1.8, capped  # 64 MiB at 32 MiB/s: 2 s

    # Retuned while running: 4 MiB/s for the first second, then uncapped.
    t0 = time.monotonic()
    retuned = await _timed_send(
        src, str(tmp_path / "b.qcow2"), lambda: 4 * MiB if time.monotonic() - t0 < 1 else None
    )
    assert retuned < 12, retuned  # at 4 MiB/s throughout it would take 16 s


async def test_zeroed_ranges_are_not_charged_to_the_rate(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 16, zero_mib=512)
    started = time.monotonic()
    digest, _port = await transfer_layer(src, str(tmp_path / "dst.qcow2"), None, rate=lambda: 16 * MiB)
    elapsed = time.monotonic() - started
    assert digest.allocated == 528 * MiB
    assert elapsed < 10, elapsed  # 16 MiB of data: about 1 s; charged for the zeroes it would be 33 s
    assert [e.zero for e in await layer_extents(str(tmp_path / "dst.qcow2"))] == [False, True]


async def test_progress_is_monotonic_and_ends_at_total(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 32)
    progress: list[tuple[int, int]] = []
    await transfer_layer(src, str(tmp_path / "dst.qcow2"), None, rate=lambda: 16 * MiB, progress=progress)
    assert progress[-1] == (32 * MiB, 32 * MiB)
    dones = [d for d, _t in progress]
    assert dones == sorted(dones)
    assert all(d < t for d, t in progress[:-1])


async def test_raw_layer(tmp_path: Path) -> None:
    src = create(tmp_path / "disk.raw", 32 * MiB, fmt="raw")
    qemu_io(src, "write -P 0x44 1M 3M", "write -P 0x45 20M 1M", fmt="raw")
    dst = str(tmp_path / "copy.raw")
    await transfer_layer(src, dst, None)
    assert (await qemuimg.info(dst)).format == "raw"
    assert await qemuimg.compare(src, dst)
    assert os.stat(dst).st_blocks * 512 < 16 * MiB  # holes stayed holes


async def test_export_listens_only_on_the_given_address(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 1)
    info = await qemuimg.info(src)
    incoming = await IncomingLayer.prepare(
        str(tmp_path / "dst.qcow2"), "qcow2", info.virtual_size, listen_host="127.0.0.2"
    )
    try:
        port = incoming.endpoint.port
        assert not port_closed("127.0.0.2", port)
        assert port_closed(LOOPBACK, port)
    finally:
        await incoming.abort()
    assert port_closed("127.0.0.2", port)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "hostb.example"])
async def test_wildcard_or_name_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(InvalidRequest):
        await IncomingLayer.prepare(str(tmp_path / "dst.qcow2"), "qcow2", MiB, listen_host=host)
    assert not os.path.exists(tmp_path / "dst.qcow2")
    assert not qsd_children()


@pytest.mark.parametrize("cluster", [4096, 65536, 2 * MiB])
async def test_allocation_is_kept_at_any_cluster_size(tmp_path: Path, cluster: int) -> None:
    base = create(tmp_path / "base.qcow2", 32 * MiB)
    qemu_io(base, "write -P 0x11 0 32M")
    top = create(tmp_path / "top.qcow2", 32 * MiB, Path(base), cluster_size=cluster)
    qemu_io(top, "write -P 0x22 4k 4k", "write -z 100k 4k", "write -P 0x23 3M 8k", "write -P 0x24 20M 1M")
    dst_base, dst_top = str(tmp_path / "dst-base.qcow2"), str(tmp_path / "dst-top.qcow2")
    await transfer_layer(base, dst_base, None, tls=False)
    await transfer_layer(top, dst_top, dst_base, tls=False)
    assert (await qemuimg.info(dst_top)).cluster_size == cluster
    assert await layer_extents(dst_top) == await layer_extents(top)
    assert await qemuimg.compare(top, dst_top)


async def test_a_killed_destination_daemon_fails_the_copy(tmp_path: Path) -> None:
    src = _big_layer(tmp_path, 64)
    dst = str(tmp_path / "dst.qcow2")
    incoming = await _incoming_for(src, dst)
    moving = asyncio.Event()
    send = asyncio.create_task(
        send_layer_to(
            src, "qcow2", incoming.endpoint, rate=lambda: 8 * MiB, on_progress=_recorder([], moving)
        )
    )
    async with asyncio.timeout(30):
        await moving.wait()
    assert incoming.daemon_pid is not None
    os.kill(incoming.daemon_pid, signal.SIGKILL)
    with pytest.raises(TransferFailed, match=f"copying layer {src}"):
        async with asyncio.timeout(60):
            await send
    with pytest.raises(StorageError):
        await incoming.finish()  # the image was never flushed: it cannot count as finished
    await incoming.abort()
    assert not os.path.exists(dst)
    assert not qsd_children()


async def test_an_empty_layer_arrives_empty(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    qemu_io(base, "write -P 0x11 0 8M")
    top = create(tmp_path / "top.qcow2", 8 * MiB, Path(base))
    dst_base, dst_top = str(tmp_path / "dst-base.qcow2"), str(tmp_path / "dst-top.qcow2")
    await transfer_layer(base, dst_base, None)
    progress: list[tuple[int, int]] = []
    digest, _port = await transfer_layer(top, dst_top, dst_base, progress=progress)
    assert digest.allocated == 0
    assert await layer_extents(dst_top) == []
    assert progress[-1] == (0, 0)


async def test_small_writes_into_bigger_clusters_take_the_rest_from_the_backing(tmp_path: Path) -> None:
    """Why the destination opens its backing: a 4 KiB write into a 64 KiB cluster gets the rest from below."""
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    qemu_io(base, "write -P 0x11 0 8M")
    top = create(tmp_path / "top.qcow2", 8 * MiB, Path(base), cluster_size=4096)
    qemu_io(top, "write -P 0x22 4k 4k")
    dst = str(tmp_path / "dst-top.qcow2")
    incoming = await IncomingLayer.prepare(
        dst, "qcow2", 8 * MiB, listen_host=LOOPBACK, backing=base, tls=False
    )
    try:
        await send_layer_to(top, "qcow2", incoming.endpoint, rate=lambda: None)
        await incoming.finish()
    finally:
        if incoming.state is not IncomingState.FINISHED:
            await incoming.abort()
    assert (await qemuimg.info(dst)).cluster_size == 65536
    assert await qemuimg.compare(top, dst)
