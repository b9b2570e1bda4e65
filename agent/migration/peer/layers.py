"""Sending a chain's lower layers to the destination host, one at a time, each verified before the next.

The destination agent creates the layer and exports it over NBD (TLS-PSK, a fresh key and export name per
layer, handed over on the authenticated agent API); this side copies the layer's own clusters into it with
a qemu-storage-daemon mirror (``agent.transfer``), at the task's current budget, then the destination
checks it against the digest computed here from the source layer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from agent.migration.peer.client import DestinationAgent
from agent.transfer.endpoint import NbdEndpoint
from agent.transfer.send import TransferInterrupted, send_layer_to
from agent.transfer.verify import layer_digest

#: How long a layer is sent again while the destination's export cannot be reached (a link down for this
#: long fails the task; the fault matrix cuts it for 20 s), and the pause between two tries.
LINK_OUTAGE_S, AGAIN_S = 60.0, 2.0


async def send_layer_to_peer(
    peer: DestinationAgent,
    migration_id: str,
    target: str,
    index: int,
    src: str,
    fmt: str,
    *,
    rate: Callable[[], int | None],
    on_progress: Callable[[int, int], None],
    log: logging.LoggerAdapter[logging.Logger],
) -> None:
    """Open the destination's export, copy, and have the destination verify; raises on any mismatch."""
    ref = {"target": target, "index": index}
    opened = await peer.open_layer(migration_id, ref)
    endpoint = NbdEndpoint.from_dict(opened["endpoint"])
    # The digest of the source layer is read while the copy runs: both only read the read-only layer.
    digest = asyncio.ensure_future(layer_digest(src, fmt, force_share=True))
    try:
        broke_at: float | None = None
        while True:
            try:
                result = await send_layer_to(
                    src, fmt, endpoint, rate=rate, on_progress=on_progress, force_share=True
                )
                break
            except TransferInterrupted as err:
                broke_at = broke_at or time.monotonic()
                if time.monotonic() - broke_at > LINK_OUTAGE_S:
                    raise
                log.warning(
                    "layer %s: %s (%s); sending it again in %.0f s",
                    src,
                    err.description,
                    err.details,
                    AGAIN_S,
                )
                await asyncio.sleep(AGAIN_S)
        source_digest = await digest
    except BaseException:
        digest.cancel()
        await asyncio.gather(digest, return_exceptions=True)
        raise
    await peer.finish_layer(migration_id, ref, source_digest.to_dict())
    log.info(
        "layer %s sent to %s (%d bytes in %.1f s) and verified there",
        src,
        opened["path"],
        result.bytes_total,
        result.seconds,
    )


@dataclass(frozen=True)
class LayerToSend:
    """One file of a disk's chain on the destination: ``index`` 0 is the base; ``item`` names its progress."""

    target: str
    index: int
    src: str
    fmt: str
    item: str


async def send_layers_to_peer(
    peer: DestinationAgent,
    migration_id: str,
    layers: Iterable[LayerToSend],
    *,
    rate: Callable[[], int | None],
    progress: Callable[[str, int, int], None],
    log: logging.LoggerAdapter[logging.Logger],
    sent: Callable[[LayerToSend], Awaitable[None]] | None = None,
) -> None:
    """Send ``layers`` in order, each verified on the destination before the next; ``sent`` is awaited after
    each (a resumable caller journals it there)."""
    for layer in layers:

        def on_progress(done: int, total: int, item: str = layer.item) -> None:
            progress(item, done, total)

        await send_layer_to_peer(
            peer,
            migration_id,
            layer.target,
            layer.index,
            layer.src,
            layer.fmt,
            rate=rate,
            on_progress=on_progress,
            log=log,
        )
        if sent is not None:
            await sent(layer)
