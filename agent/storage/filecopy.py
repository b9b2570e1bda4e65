"""Sparse, rate-limited, cancellable copy of one image file (a read-only lower layer of a chain).

Lower layers are never written by the guest, so copying the file itself (holes kept, via SEEK_DATA /
SEEK_HOLE) gives a byte-identical layer outside the guest's I/O path; only the backing pointer in its
header is rewritten afterwards. The rate is charged for the bytes really read, never for holes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable

from agent.errors import Code, StorageError

CHUNK = 4 * 1024 * 1024


class TokenBucket:
    """Paces a byte stream to ``rate()`` bytes/s (None: unlimited); the rate may change between calls."""

    def __init__(self, rate: Callable[[], int | None], burst_s: float = 0.25) -> None:
        self._rate = rate
        self._burst_s = burst_s
        self._tokens = 0.0
        self._last = time.monotonic()

    def delay_for(self, nbytes: int) -> float:
        """Charge ``nbytes``; return how long to sleep before sending them."""
        rate = self._rate()
        now = time.monotonic()
        if not rate:
            self._last = now
            self._tokens = 0.0
            return 0.0
        self._tokens = min(self._tokens + (now - self._last) * rate, rate * self._burst_s)
        self._last = now
        self._tokens -= nbytes
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / rate


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after offset
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end - start))
        offset = end
    return extents


def allocated_bytes(path: str) -> int:
    """Bytes in data extents of the file (what a sparse copy reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(length for _start, length in _data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def copy_sparse(
    src: str,
    dst: str,
    *,
    rate: Callable[[], int | None],
    on_bytes: Callable[[int], None],
    stop: threading.Event,
) -> int:
    """Copy ``src`` to the new file ``dst`` (must not exist), holes kept; returns bytes copied.

    Blocking: run it in a thread. ``stop`` aborts between chunks (the caller removes ``dst``).
    """
    bucket = TokenBucket(rate)
    copied = 0
    src_fd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(src_fd).st_size
        try:
            dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            raise StorageError(f"cannot create {dst}: {err.strerror}") from err
        try:
            os.ftruncate(dst_fd, size)
            for start, length in _data_extents(src_fd, size):
                pos = start
                while pos < start + length:
                    if stop.is_set():
                        return copied
                    n = min(CHUNK, start + length - pos)
                    wait = bucket.delay_for(n)
                    if wait > 0 and stop.wait(wait):
                        return copied
                    data = os.pread(src_fd, n, pos)
                    if not data:
                        break
                    _write_all(dst_fd, data, pos)
                    pos += len(data)
                    copied += len(data)
                    on_bytes(len(data))
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    except OSError as err:
        raise StorageError(
            f"copying {src} to {dst} failed: {err.strerror}",
            code=Code.NO_SPACE if err.errno == errno.ENOSPC else None,
        ) from err
    finally:
        os.close(src_fd)
    return copied


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


async def copy_sparse_async(
    src: str, dst: str, *, rate: Callable[[], int | None], on_bytes: Callable[[int], None]
) -> int:
    """``copy_sparse`` in a thread; cancelling the awaiting task stops the copy before it returns."""
    stop = threading.Event()
    loop = asyncio.get_running_loop()

    def _on_bytes(n: int) -> None:
        loop.call_soon_threadsafe(on_bytes, n)

    future = loop.run_in_executor(
        None, lambda: copy_sparse(src, dst, rate=rate, on_bytes=_on_bytes, stop=stop)
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([future])
        raise
