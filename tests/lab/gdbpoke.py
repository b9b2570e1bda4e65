"""Guest-physical memory through QEMU's gdbstub (HMP `gdbserver` on a unix socket, then the GDB remote
protocol with QEMU's physical-memory mode, `Qqemu.PhyMemMode:1`): how the memory checker's lab test reads a
page of a running guest and writes an older copy back. The guest is paused while a client is attached
(QEMU stops the VM when the client connects) and runs again when it detaches."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import TracebackType

from labtools import LabHost


class GdbStub:
    def __init__(self, host: LabHost, domain: str, sock: Path) -> None:
        self.host, self.domain, self.sock = host, domain, sock
        self.conn: socket.socket | None = None
        self.buf = b""

    def __enter__(self) -> GdbStub:
        self.sock.unlink(missing_ok=True)
        self.host.virsh("qemu-monitor-command", self.domain, "--hmp", "gdbserver none")
        said = self.host.virsh(
            "qemu-monitor-command", self.domain, "--hmp", f"gdbserver unix:{self.sock},server=on,wait=off"
        )
        assert "Waiting for gdb connection" in said, said
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert time.monotonic() < deadline, f"QEMU made no gdbstub socket at {self.sock}"
            time.sleep(0.1)
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.settimeout(30)
        try:
            self.conn.connect(str(self.sock))
            reply = self.command("Qqemu.PhyMemMode:1")
            assert reply == "OK", f"gdbstub: Qqemu.PhyMemMode:1 answered {reply!r}"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.command("D")  # detach: the VM runs again
        finally:
            assert self.conn is not None
            self.conn.close()
            self.host.virsh("qemu-monitor-command", self.domain, "--hmp", "gdbserver none", check=False)
            self.sock.unlink(missing_ok=True)

    def command(self, data: str) -> str:
        assert self.conn is not None
        payload = data.encode()
        self.conn.sendall(b"$" + payload + b"#" + f"{sum(payload) % 256:02x}".encode())
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                reply = self.buf[start + 1 : end].decode()
                self.buf = self.buf[end + 3 :]
                self.conn.sendall(b"+")
                if reply[:1] in ("T", "S"):  # a stop notice (QEMU stops the VM when a client attaches)
                    continue
                return reply
            chunk = self.conn.recv(65536)
            assert chunk, "the gdbstub closed the connection"
            self.buf += chunk

    def read(self, address: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            n = min(1024, length - len(out))
            reply = self.command(f"m{address + len(out):x},{n:x}")
            assert not reply.startswith("E"), f"reading 0x{address + len(out):x}: {reply}"
            out += bytes.fromhex(reply)
        return out

    def write(self, address: int, data: bytes) -> None:
        for off in range(0, len(data), 1024):  # the stub takes packets of at most 4096 characters
            part = data[off : off + 1024]
            reply = self.command(f"M{address + off:x},{len(part):x}:{part.hex()}")
            assert reply == "OK", f"writing 0x{address + off:x}: {reply}"
