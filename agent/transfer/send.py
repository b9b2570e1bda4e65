"""Source side of a layer transfer: copy exactly one layer of a chain into a destination NBD export.

Mechanism (QEMU 7.2; case 3 of ``scripts/bench`` measures it against ``qemu-img convert -n`` into the same
kind of export between the lab hosts, side by side in one run; figures in docs/performance.md):
- ``blockdev-mirror`` with ``sync: "top"`` from the layer, opened read-only with its backing chain attached,
  into an NBD client node. "Top" copies the clusters allocated in this layer only: data as data, explicitly
  zeroed clusters as write-zeroes (which stay zero clusters at the destination, masking the layers below),
  and skips what the layer leaves to its backing, so unallocated stays unallocated. The backing must be
  attached: QEMU decides "allocated in this layer" against it, and reads at its 64 KiB copy granularity see
  the right bytes. The job goes READY when everything is copied (nobody writes the source, see
  ``agent.transfer.nodes``); ``block-job-cancel`` then ends it without a pivot, which is QEMU's way to finish
  a mirror that only copies.
  ``blockdev-backup`` (``sync: "top"``) does the same copy but cost about twice the CPU on the sending side
  (2.0 s against 0.8-1.0 s for ``qemu-img convert`` and the mirror, per 2 GiB), which is throughput on a
  busy host.
- The rate: a ``throttle`` filter node with a throttle group limiting ``bps-read`` sits between the layer and
  the job, and ``qom-set`` retunes it whenever ``rate()`` changes (checked every ``poll_s``). Charging the
  reads charges exactly the data bytes: the job's own ``speed`` (mirror and backup alike) also charges
  zeroed areas (measured: 512 MiB zeroed + 64 MiB data took 18 s at 32 MiB/s instead of 2 s).
- Progress from ``query-jobs``; the end from ``BLOCK_JOB_COMPLETED`` (an error there names the layer).
- Cancellation (the calling task cancelled) cancels the job and stops the daemon, then re-raises. A daemon
  that dies mid-copy is a ``TransferFailed`` naming the layer, the daemon and how it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from agent.errors import Code, StorageError
from agent.storage import qemuimg
from agent.storage.locations import RbdImage
from agent.storage.rbdkey import KeyedPool
from agent.transfer.endpoint import NbdEndpoint, add_psk_credentials
from agent.transfer.nodes import add_read_only_chain
from agent.transfer.qsd import DaemonCommandFailed, DaemonError, StorageDaemon, finish_shielded

log = logging.getLogger(__name__)

JOB = "transfer"
THROTTLE_GROUP = "rate"
RATE_NODE = "src-rate"
TARGET_NODE = "dst"

RateFn = Callable[[], int | None]
ProgressFn = Callable[[int, int], None]


class TransferFailed(StorageError):
    code = Code.TRANSFER_FAILED


class TransferInterrupted(TransferFailed):
    """The destination's export could not be reached, or the copy into it broke off: a link that comes
    back lets the same layer be sent again (the export stays open; the destination verifies the result)."""


@dataclass(frozen=True)
class SendResult:
    bytes_total: int  # what the layer allocates (data and explicit zeroes) = the job's total
    seconds: float


async def send_layer(
    src_path: str,
    src_format: str,
    nbd_host: str,
    port: int,
    export_name: str,
    *,
    rate: RateFn,
    on_progress: ProgressFn | None = None,
    psk: str | None = None,
    force_share: bool = False,
    poll_s: float = 0.5,
    runtime_dir: str | None = None,
) -> SendResult:
    """Copy the layer ``src_path`` into the export; ``rate()`` in bytes/s (None or 0: unlimited).

    ``force_share`` opens the layer even if another process holds it for writing (then the copy is only
    right if that process does not write meanwhile; see ``agent.transfer.nodes``).
    """

    async def connect(daemon: StorageDaemon, virtual_size: int) -> None:
        await _connect_target(daemon, nbd_host, port, export_name, psk, virtual_size, src_path)

    return await _copy_layer(
        src_path,
        src_format,
        f"{nbd_host}:{port}",
        connect,
        rate=rate,
        on_progress=on_progress,
        force_share=force_share,
        poll_s=poll_s,
        runtime_dir=runtime_dir,
    )


async def copy_layer_into_rbd(
    src_path: str,
    src_format: str,
    keyed: KeyedPool,
    image: RbdImage,
    *,
    rate: RateFn,
    on_progress: ProgressFn | None = None,
    poll_s: float = 0.5,
) -> SendResult:
    """Copy the layer ``src_path`` (its own clusters: data, and explicit zeroes by unmapping) into the RBD
    image, whose content is that of the layer's backing chain already (a chain kept as RBD snapshots: each
    lower layer written over the one below, then snapshotted). The image has the layer's virtual size."""

    async def connect(daemon: StorageDaemon, virtual_size: int) -> None:
        await daemon.execute("object-add", keyed.secret_object())
        node = {**keyed.node(image), "node-name": TARGET_NODE, "discard": "unmap"}
        try:
            await daemon.execute("blockdev-add", node)
        except DaemonCommandFailed as err:
            raise TransferFailed(
                f"cannot open {image} to write layer {src_path}", details=err.qmp_desc
            ) from err
        await _check_target_size(daemon, virtual_size, src_path)

    return await _copy_layer(
        src_path, src_format, str(image), connect, rate=rate, on_progress=on_progress, poll_s=poll_s
    )


async def _copy_layer(
    src_path: str,
    src_format: str,
    where: str,
    connect: Callable[[StorageDaemon, int], Awaitable[None]],
    *,
    rate: RateFn,
    on_progress: ProgressFn | None,
    force_share: bool = False,
    poll_s: float,
    runtime_dir: str | None = None,
) -> SendResult:
    """The copy itself: the layer (its chain attached, read-only) mirrored ``sync: top`` through the rate's
    throttle into the target node ``connect`` adds."""
    chain = await qemuimg.backing_chain(src_path)
    if chain[0].format != src_format:
        raise StorageError(f"{src_path} is {chain[0].format}, not {src_format}", field="format")
    daemon = StorageDaemon(f"send:{Path(src_path).name}", runtime_dir=runtime_dir)
    started = time.monotonic()
    job_started = False
    try:
        await daemon.start()
        source = await _open_source(daemon, chain, force_share)
        limit = _limit(rate())
        await daemon.execute(
            "object-add", {"qom-type": "throttle-group", "id": THROTTLE_GROUP, "limits": {"bps-read": limit}}
        )
        await daemon.execute(
            "blockdev-add",
            {"driver": "throttle", "node-name": RATE_NODE, "throttle-group": THROTTLE_GROUP, "file": source},
        )
        await connect(daemon, chain[0].virtual_size)
        with daemon.listen("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") as events:
            await daemon.execute(
                "blockdev-mirror",
                {
                    "job-id": JOB,
                    "device": RATE_NODE,
                    "target": TARGET_NODE,
                    "sync": "top",
                    **_granularity(chain[0]),
                    "auto-finalize": True,
                    "auto-dismiss": True,
                },
            )
            job_started = True
            log.info("copying layer %s to %s (rate %s B/s)", src_path, where, limit or "unlimited")
            total = await _drive(daemon, events, rate, limit, on_progress, poll_s, src_path)
            job_started = False
        seconds = time.monotonic() - started
        log.info("layer %s copied to %s: %d bytes in %.1f s", src_path, where, total, seconds)
        return SendResult(total, seconds)
    except DaemonError as err:  # died, or a command failed: name the layer
        raise TransferFailed(
            f"copying layer {src_path} to {where} failed: {err.description}", details=err.details
        ) from err
    finally:
        await finish_shielded(_teardown(daemon, job_started))


async def send_layer_to(
    src_path: str,
    src_format: str,
    endpoint: NbdEndpoint,
    *,
    rate: RateFn,
    on_progress: ProgressFn | None = None,
    force_share: bool = False,
    poll_s: float = 0.5,
) -> SendResult:
    """``send_layer`` with the endpoint the destination agent handed over."""
    return await send_layer(
        src_path,
        src_format,
        endpoint.host,
        endpoint.port,
        endpoint.export_name,
        psk=endpoint.psk,
        rate=rate,
        on_progress=on_progress,
        force_share=force_share,
        poll_s=poll_s,
    )


def _granularity(layer: qemuimg.ImageInfo) -> dict[str, int]:
    """Copy at the layer's cluster size when it is below the mirror's 64 KiB default.

    Otherwise a 4 KiB cluster allocated in the layer is copied as 64 KiB read through the chain, and the
    destination layer allocates (correct) data that the source layer leaves to its backing.
    """
    cluster = layer.cluster_size
    if layer.format == "qcow2" and cluster and 512 <= cluster < 65536:
        return {"granularity": cluster}
    return {}


def _limit(value: int | None) -> int:
    return max(0, int(value or 0))  # the throttle group takes 0 as "no limit"


async def _open_source(daemon: StorageDaemon, chain: list[qemuimg.ImageInfo], force_share: bool) -> str:
    try:
        return await add_read_only_chain(daemon, chain, "src", force_share=force_share)
    except DaemonCommandFailed as err:
        if "lock" in err.qmp_desc:
            raise TransferFailed(
                f"layer {chain[0].path} is open for writing by another process; it cannot be copied",
                details=f"{err.qmp_desc} (a running VM's active layer, or a block job writing into it)",
            ) from err
        raise


async def _connect_target(
    daemon: StorageDaemon,
    host: str,
    port: int,
    export_name: str,
    psk: str | None,
    virtual_size: int,
    src_path: str,
) -> None:
    node: dict[str, Any] = {
        "driver": "nbd",
        "node-name": TARGET_NODE,
        "server": {"type": "inet", "host": host, "port": str(port)},
        "export": export_name,
    }
    if psk is not None:
        node["tls-creds"] = await add_psk_credentials(daemon, psk, "client")
    try:
        await daemon.execute("blockdev-add", node)
    except DaemonCommandFailed as err:
        raise TransferInterrupted(
            f"cannot open the destination export for layer {src_path} at {host}:{port}",
            details=err.qmp_desc,
        ) from err
    await _check_target_size(daemon, virtual_size, src_path)


async def _check_target_size(daemon: StorageDaemon, virtual_size: int, src_path: str) -> None:
    nodes = await daemon.execute("query-named-block-nodes", {"flat": True})
    size = next(int(n["image"]["virtual-size"]) for n in nodes if n["node-name"] == TARGET_NODE)
    if size != virtual_size:
        raise TransferFailed(
            f"the destination of layer {src_path} has {size} bytes, the layer {virtual_size}",
            details="the destination layer must be created with the source layer's virtual size",
        )


async def _drive(
    daemon: StorageDaemon,
    events: EventListener,
    rate: RateFn,
    limit: int,
    on_progress: ProgressFn | None,
    poll_s: float,
    src_path: str,
) -> int:
    """Run the job to its end: retune the rate, report progress; return the job's total bytes."""
    done = total = missing = 0
    next_poll = time.monotonic()
    while True:
        wait = max(0.0, next_poll - time.monotonic())
        event = await daemon.next_event(events, timeout_s=wait)
        if event is not None:
            data = event.get("data", {})
            if data.get("device") != JOB:
                continue
            kind = event["event"]
            if kind == "BLOCK_JOB_READY":
                # Everything is copied; cancelling a READY mirror completes it without a pivot.
                await daemon.execute("block-job-cancel", {"device": JOB})
            elif kind == "BLOCK_JOB_COMPLETED":
                if "error" in data:
                    raise TransferInterrupted(f"copying layer {src_path} failed: {data['error']}")
                total = int(data.get("len", total))
                if on_progress is not None:
                    on_progress(total, total)
                return total
            elif kind == "BLOCK_JOB_CANCELLED":
                raise TransferFailed(f"the copy of layer {src_path} was cancelled inside QEMU")
            continue
        next_poll = time.monotonic() + poll_s
        wanted = _limit(rate())
        if wanted != limit:
            await daemon.execute(
                "qom-set", {"path": THROTTLE_GROUP, "property": "limits", "value": {"bps-read": wanted}}
            )
            log.info("layer %s: rate %s -> %s B/s", src_path, limit or "unlimited", wanted or "unlimited")
            limit = wanted
        jobs = [job for job in await daemon.execute("query-jobs") if job["id"] == JOB]
        if not jobs:
            # Gone without a terminal event: QEMU sends it before the job disappears, so this is not a
            # race but a lost job. Allow a few polls anyway before calling it that.
            missing += 1
            if missing >= 3:
                raise TransferFailed(f"the copy job of layer {src_path} vanished without completing")
            continue
        missing = 0
        total = max(total, int(jobs[0]["total-progress"]))
        done = min(total, max(done, int(jobs[0]["current-progress"])))
        if on_progress is not None and total:
            on_progress(min(done, total - 1), total)  # 100 % only once COMPLETED says so


async def _teardown(daemon: StorageDaemon, job_running: bool) -> None:
    if job_running and daemon.running:
        with contextlib.suppress(StorageError, TimeoutError):
            async with asyncio.timeout(2):
                await daemon.execute("job-cancel", {"id": JOB})
    await daemon.stop()
