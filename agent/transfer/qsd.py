"""One ``qemu-storage-daemon`` child process driven over QMP with ``qemu.qmp``.

The daemon gets a private working directory (``mkdtemp``: mode 0700) that holds its QMP socket, its log and
any key files. We listen on the QMP socket and the daemon connects to us (``server=off``), so there is no
window in which another local process could grab the monitor, and no polling for the socket to appear.

Lifetime rules, because a stray daemon would keep an NBD port or an image open:
- ``stop()`` asks with ``quit``, waits a bounded time, then kills the pid; the child is always reaped and the
  working directory removed. It completes even when the calling task is cancelled (the cancellation is then
  re-raised, never swallowed).
- The daemon is started under ``setpriv --pdeathsig KILL`` (util-linux) when available, so it dies with the
  agent even if the agent is killed with SIGKILL. The death signal follows the thread that forked the child:
  the event loop's thread, which is the main thread in the agent.

Errors (extending ``agent.errors``):

StorageError
 +- DaemonError          the daemon could not be started or driven
     +- DaemonDied       the process exited (or its monitor closed) while we still needed it
     +- DaemonCommandFailed  a QMP command answered with an error (``qmp_class``, ``qmp_desc``)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecInterruptedError, QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from agent.errors import Code, StorageError

log = logging.getLogger(__name__)

QSD_BINARY = "qemu-storage-daemon"
SETPRIV = "setpriv"

T = TypeVar("T")


class DaemonError(StorageError):
    code = Code.STORAGE_DAEMON


class DaemonDied(DaemonError):
    code = Code.STORAGE_DAEMON_DIED


class DaemonCommandFailed(DaemonError):
    def __init__(self, description: str, *, qmp_class: str, qmp_desc: str, **kwargs: Any) -> None:
        super().__init__(description, **kwargs)
        self.qmp_class = qmp_class
        self.qmp_desc = qmp_desc


async def finish_shielded(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if we are cancelled meanwhile; then re-raise that cancellation.

    For teardown steps that must not be cut in half (a daemon half stopped is a daemon left behind).
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


def _chardev_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # QEMU option syntax: a comma in a value is doubled


class StorageDaemon:
    """A ``qemu-storage-daemon`` child with its QMP monitor; use as ``async with StorageDaemon(name):``."""

    def __init__(
        self,
        name: str,
        *,
        binary: str = QSD_BINARY,
        runtime_dir: str | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.name = name
        self._binary = binary
        self._runtime_dir = runtime_dir
        self._start_timeout_s = start_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._workdir: Path | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def workdir(self) -> Path:
        """The daemon's private directory (0700), removed by ``stop()``."""
        if self._workdir is None:
            raise DaemonError(f"storage daemon {self.name} is not started")
        return self._workdir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not self._stopped

    async def __aenter__(self) -> StorageDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._proc is not None or self._stopped:
            raise DaemonError(f"storage daemon {self.name} was already started")
        if shutil.which(self._binary) is None:
            raise DaemonError(f"{self._binary} is not installed", details="it comes with qemu-utils")
        self._workdir = Path(tempfile.mkdtemp(prefix="ksa-qsd-", dir=self._runtime_dir))
        sock = self._workdir / "qmp.sock"
        self._qmp = QMPClient(self.name)
        # We listen and accept ourselves, then hand the connected socket to QMPClient.connect(). Cancelling
        # QMPClient.start_server() or connect() at the wrong moment leaks a coroutine or a transport
        # (qemu.qmp 0.0.6), so connect() on the accepted socket runs shielded, bounded by its own timeout.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(sock))
            listener.listen(1)
            listener.setblocking(False)
            await self._spawn(sock)
            async with asyncio.timeout(self._start_timeout_s):
                conn = await self._accept(listener)
            await finish_shielded(self._connect(conn))
        except BaseException as err:
            tail = self._log_tail()
            await finish_shielded(self._teardown())
            if isinstance(err, QMPError | OSError | TimeoutError):
                raise DaemonError(
                    f"storage daemon {self.name} did not start", details=tail or str(err)
                ) from err
            raise
        finally:
            listener.close()
        log.info("storage daemon %s started (pid %s)", self.name, self.pid)

    async def _accept(self, listener: socket.socket) -> socket.socket:
        accept = asyncio.ensure_future(asyncio.get_running_loop().sock_accept(listener))
        try:
            conn, _ = await self._until_exit(accept, "while starting")
        except BaseException:
            if accept.done() and not accept.cancelled() and accept.exception() is None:
                accept.result()[0].close()  # accepted just as we were cancelled
            raise
        return conn

    async def _connect(self, conn: socket.socket) -> None:
        assert self._qmp is not None
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await self._until_exit(self._qmp.connect(conn), "while starting")
        except BaseException:
            conn.close()
            raise

    async def _spawn(self, sock: Path) -> None:
        prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if shutil.which(SETPRIV) else []
        logfd = os.open(self.workdir / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *prefix,
                self._binary,
                "--chardev",
                f"socket,id=qmp0,path={_chardev_path(sock)},server=off",
                "--monitor",
                "chardev=qmp0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfd,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            os.close(logfd)

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; a QMP error is ``DaemonCommandFailed``, a dead daemon ``DaemonDied``."""
        qmp = self._require_qmp()
        try:
            return await self._until_exit(qmp.execute(cmd, args), f"during {cmd}")
        except ExecuteError as err:
            raise DaemonCommandFailed(
                f"{cmd} failed on storage daemon {self.name}: {err}",
                qmp_class=err.error_class,
                qmp_desc=str(err),
            ) from err
        except (ExecInterruptedError, QMPError, EOFError, OSError) as err:
            raise await self._died(f"during {cmd}") from err

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """Collect the named events (all when none given) while the block runs."""
        listener = EventListener(names or None)
        with self._require_qmp().listen(listener):
            yield listener

    async def next_event(
        self, listener: EventListener, timeout_s: float | None = None
    ) -> dict[str, Any] | None:
        """The next event of ``listener``, None after ``timeout_s``; ``DaemonDied`` if the daemon exits first.

        The wait for the event is never cancelled once it may hold an event (a timeout via cancellation could
        drop one that arrived at the same moment), hence the explicit timeout.
        """
        proc = self._proc
        if proc is None:
            raise DaemonError(f"storage daemon {self.name} is not started")
        get = asyncio.ensure_future(listener.get())
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([get, exited], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return dict(get.result())
        if exited.done() and not exited.cancelled():
            raise await self._died("while waiting for an event")
        return None

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Quit, wait ``timeout_s``, kill; always reaped, working directory removed. Idempotent."""
        await finish_shielded(self._stop(timeout_s))

    async def _stop(self, timeout_s: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.returncode is None and self._qmp is not None:
            with contextlib.suppress(QMPError, EOFError, OSError, TimeoutError):
                async with asyncio.timeout(timeout_s / 2):
                    await self._qmp.execute("quit")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s / 2):
                    await proc.wait()
            if proc.returncode is None:
                log.warning("storage daemon %s (pid %s) ignored quit; killing it", self.name, proc.pid)
        await self._teardown()
        if proc is not None:
            log.info("storage daemon %s (pid %s) stopped (exit %s)", self.name, proc.pid, proc.returncode)

    async def _teardown(self) -> None:
        """Kill and reap the child, close the monitor, remove the working directory."""
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
        finally:
            if self._qmp is not None:
                # After quit the bottom half ends with EOFError, which disconnect() re-raises.
                with contextlib.suppress(QMPError, EOFError, OSError):
                    await self._qmp.disconnect()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    async def _until_exit(self, aw: Awaitable[T], when: str) -> T:
        """Await ``aw`` unless the daemon exits first (then ``DaemonDied``)."""
        proc = self._proc
        if proc is None:
            raise DaemonError(f"storage daemon {self.name} is not started")
        work = asyncio.ensure_future(aw)
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([work, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        if work.done() and not work.cancelled():
            return work.result()
        raise await self._died(when)

    async def _died(self, when: str) -> DaemonDied:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # The monitor often closes a moment before the child watcher sees the exit: wait for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await proc.wait()
        rc = proc.returncode if proc is not None else None
        if rc is None:
            how = "closed its monitor"
        elif rc < 0:
            how = f"was killed by signal {signal.Signals(-rc).name}"
        else:
            how = f"exited with status {rc}"
        return DaemonDied(
            f"storage daemon {self.name} (pid {self.pid}) {how} {when}", details=self._log_tail() or None
        )

    def _require_qmp(self) -> QMPClient:
        if self._qmp is None or self._proc is None or self._stopped:
            raise DaemonError(f"storage daemon {self.name} is not running")
        return self._qmp

    def _log_tail(self, limit: int = 2000) -> str:
        if self._workdir is None:
            return ""
        try:
            with open(self._workdir / "daemon.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""
