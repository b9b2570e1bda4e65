"""A minimal read-only NBD client over a local unix socket, for hashing an image's guest-visible bytes.

Only what the verification needs: fixed newstyle handshake, ``NBD_OPT_GO``, ``NBD_CMD_READ`` with simple
replies (a few requests in flight, matched by handle because QEMU may answer out of order), and
``NBD_CMD_DISC``. The server is our own ``qemu-storage-daemon`` on a socket in its private directory, so
this never talks to the network and needs no TLS. Spec: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncGenerator, Sequence

from agent.errors import StorageError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_DISC = 2
REP_ERROR_BIT = 1 << 31


class NbdReader:
    """``async with NbdReader(socket_path, export) as r: async for chunk in r.read_ranges(ranges)``."""

    def __init__(self, socket_path: str, export_name: str) -> None:
        self._path = socket_path
        self._export = export_name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.size = 0

    async def __aenter__(self) -> NbdReader:
        self._reader, self._writer = await asyncio.open_unix_connection(self._path)
        try:
            await self._handshake()
        except BaseException:
            self._writer.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            if not writer.is_closing():
                writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handshake(self) -> None:
        r, w = self._streams()
        magic, opt_magic, _flags = struct.unpack(">8sQH", await r.readexactly(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise StorageError("the NBD server does not speak fixed newstyle")
        w.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = self._export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        w.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        await w.drain()
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
            payload = await r.readexactly(length)
            if magic != REPLY_MAGIC:
                raise StorageError("bad NBD option reply")
            if rtype & REP_ERROR_BIT:
                raise StorageError(f"NBD server refused the export: {payload[4:].decode(errors='replace')}")
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size = struct.unpack(">Q", payload[2:10])[0]
            if rtype == REP_ACK:
                return

    async def read_ranges(
        self, ranges: Sequence[tuple[int, int]], window: int = 4
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of each ``(offset, length)`` in order (each length within the server's limits)."""
        r, w = self._streams()
        pending: dict[int, bytes | None] = {}
        next_send = next_yield = 0
        while next_yield < len(ranges):
            while next_send < len(ranges) and next_send - next_yield < window:
                offset, length = ranges[next_send]
                w.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, next_send, offset, length))
                pending[next_send] = None
                next_send += 1
            await w.drain()
            while pending.get(next_yield) is None:
                magic, error, handle = struct.unpack(">IIQ", await r.readexactly(16))
                if magic != SIMPLE_REPLY_MAGIC or handle not in pending:
                    raise StorageError("bad NBD reply")
                if error:
                    offset, length = ranges[handle]
                    raise StorageError(f"NBD read of {length} bytes at {offset} failed (error {error})")
                pending[handle] = await r.readexactly(ranges[handle][1])
            chunk = pending.pop(next_yield)
            assert chunk is not None
            yield chunk
            next_yield += 1

    def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            raise StorageError("NBD reader is not connected")
        return self._reader, self._writer
