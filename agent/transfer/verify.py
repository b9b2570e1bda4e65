"""Proof that a transferred layer equals its source: a digest of the layer alone, computed on each side.

What must be equal for the destination chain to show the guest the same disk, layer by layer: the set of
ranges the layer itself allocates (there it masks everything below, data or explicit zeroes) and the
guest-visible bytes in those ranges. ``LayerDigest.sha256`` covers exactly that:
- the ranges at depth 0 of ``qemu-img map`` (``present``: allocated in this layer), merged, and
- the bytes there, read through a ``qemu-storage-daemon`` that opens the layer with its backing detached
  (so nothing below can leak in) and exports it on a private unix socket; hashed per 4 MiB block of the
  disk, zeroed ranges hashed as the zero bytes they read as, so "zero cluster" and "data cluster of
  zeroes" give the same digest (both read as zeroes and mask the same range), and a large zeroed area
  costs no reading.

Why a digest on each side rather than ``qemu-img compare`` over NBD: each side reads only its own local
disk, both at once, and only 64 hex characters cross the network; a compare over NBD reads every allocated
byte of the destination back over the same link, a second full transfer. Compare also sees the whole chain,
not the layer: a layer that wrongly zeroes what its backing holds as zeroes would pass it, and fail here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import StorageError
from agent.storage import qemuimg
from agent.transfer.nbdread import NbdReader
from agent.transfer.nodes import add_read_only_chain
from agent.transfer.qsd import StorageDaemon

log = logging.getLogger(__name__)

BLOCK = 4 * 1024 * 1024
DIGEST_VERSION = b"kvm-storage-agent layer digest v1\0"


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    zero: bool


@dataclass(frozen=True)
class LayerDigest:
    virtual_size: int
    allocated: int  # bytes the layer itself allocates (data and explicit zeroes)
    sha256: str
    data_read: int = field(default=0, compare=False)  # bytes read to compute it (differs with representation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "virtualSize": self.virtual_size,
            "allocated": self.allocated,
            "sha256": self.sha256,
            "dataRead": self.data_read,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerDigest:
        return cls(
            int(data["virtualSize"]),
            int(data["allocated"]),
            str(data["sha256"]),
            int(data.get("dataRead", 0)),
        )


async def layer_extents(path: str) -> list[Extent]:
    """What the layer itself allocates (depth 0, present), adjacent ranges of one kind merged."""
    out = await qemuimg.run(qemuimg.QEMU_IMG, "map", "-U", "--output=json", path, limit_s=300)
    extents: list[Extent] = []
    for e in json.loads(out):
        if int(e.get("depth", 0)) != 0 or not e.get("present", e.get("data", False)):
            continue
        start, length, zero = int(e["start"]), int(e["length"]), bool(e.get("zero"))
        last = extents[-1] if extents else None
        if last is not None and last.start + last.length == start and last.zero == zero:
            extents[-1] = Extent(last.start, last.length + length, zero)
        else:
            extents.append(Extent(start, length, zero))
    return extents


async def layer_digest(
    path: str, fmt: str, *, force_share: bool = False, runtime_dir: str | None = None
) -> LayerDigest:
    """The digest of the layer ``path`` alone (see the module docstring)."""
    info = await qemuimg.info(path)
    if info.format != fmt:
        raise StorageError(f"{path} is {info.format}, not {fmt}", field="format")
    extents = await layer_extents(path)
    async with StorageDaemon(f"digest:{os.path.basename(path)}", runtime_dir=runtime_dir) as daemon:
        node = await add_read_only_chain(daemon, [info], "layer", force_share=force_share, with_backing=False)
        sock = str(daemon.workdir / "nbd.sock")
        await daemon.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await daemon.execute("block-export-add", {"type": "nbd", "id": "v", "node-name": node, "name": "v"})
        async with NbdReader(sock, "v") as reader:
            digest = await _digest(reader, info.virtual_size, extents)
    log.info("layer %s: %d bytes allocated, sha256 %s", path, digest.allocated, digest.sha256)
    return digest


async def verify_layer(
    path: str,
    fmt: str,
    expected: LayerDigest,
    *,
    backing: str | None,
    backing_format: str | None = None,
    runtime_dir: str | None = None,
) -> LayerDigest:
    """Check a finished destination layer: its backing pointer names ``backing``, its digest ``expected``."""
    info = await qemuimg.info(path)
    if backing is None:
        if info.backing is not None:
            raise StorageError(f"{path} points at {info.backing}, expected no backing file")
    else:
        if info.backing is None or os.path.realpath(info.backing) != os.path.realpath(backing):
            raise StorageError(f"{path} points at {info.backing}, expected {backing}")
        if backing_format is not None and info.backing_format != backing_format:
            raise StorageError(
                f"{path} names its backing as {info.backing_format}, expected {backing_format}"
            )
    actual = await layer_digest(path, fmt, runtime_dir=runtime_dir)
    if actual != expected:
        raise StorageError(
            f"{path} differs from its source layer",
            details=f"source {expected.to_dict()}, destination {actual.to_dict()}",
        )
    return actual


async def _digest(reader: NbdReader, virtual_size: int, extents: list[Extent]) -> LayerDigest:
    total = hashlib.sha256(DIGEST_VERSION + struct.pack(">Q", virtual_size))
    for start, length in _coverage(extents):
        total.update(struct.pack(">QQ", start, length))
    blocks = _blocks(extents)
    reads = [(p.start, p.length) for _index, pieces in blocks for p in pieces if not p.zero]
    chunks = reader.read_ranges(reads)
    data_read = 0
    for index, pieces in blocks:
        if all(p.zero for p in pieces):
            block_hash = _zero_hash(sum(p.length for p in pieces))
        else:
            h = hashlib.sha256()
            for p in pieces:
                if p.zero:
                    h.update(bytes(p.length))
                else:
                    chunk = await anext(chunks)
                    data_read += len(chunk)
                    h.update(chunk)
            block_hash = h.digest()
        total.update(struct.pack(">Q", index) + block_hash)
    await chunks.aclose()
    allocated = sum(e.length for e in extents)
    return LayerDigest(virtual_size, allocated, total.hexdigest(), data_read)


def _coverage(extents: list[Extent]) -> list[tuple[int, int]]:
    """Allocated ranges regardless of kind, merged."""
    merged: list[tuple[int, int]] = []
    for e in extents:
        if merged and merged[-1][0] + merged[-1][1] == e.start:
            merged[-1] = (merged[-1][0], merged[-1][1] + e.length)
        else:
            merged.append((e.start, e.length))
    return merged


def _blocks(extents: list[Extent]) -> list[tuple[int, list[Extent]]]:
    """The extents cut at 4 MiB boundaries of the disk, grouped by block index."""
    blocks: list[tuple[int, list[Extent]]] = []
    for e in extents:
        pos, end = e.start, e.start + e.length
        while pos < end:
            index = pos // BLOCK
            piece_end = min(end, (index + 1) * BLOCK)
            piece = Extent(pos, piece_end - pos, e.zero)
            if blocks and blocks[-1][0] == index:
                blocks[-1][1].append(piece)
            else:
                blocks.append((index, [piece]))
            pos = piece_end
    return blocks


@functools.lru_cache(maxsize=64)
def _zero_hash(length: int) -> bytes:
    return hashlib.sha256(bytes(length)).digest()
