"""The qemu-storage-daemon wrapper: start, commands, events, death, and stop that never leaves a daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_transfer_support import needs_qemu, qsd_children

from agent.transfer.qsd import DaemonCommandFailed, DaemonDied, DaemonError, StorageDaemon

pytestmark = needs_qemu

REPO = Path(__file__).resolve().parents[3]


async def test_start_execute_stop() -> None:
    daemon = StorageDaemon("t")
    await daemon.start()
    pid, workdir = daemon.pid, daemon.workdir
    assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
    version = await daemon.execute("query-version")
    assert version["qemu"]["major"] >= 7
    await daemon.stop()
    await daemon.stop()  # idempotent
    assert not workdir.exists()
    assert pid is not None and not psutil.pid_exists(pid)
    assert not qsd_children()
    with pytest.raises(DaemonError):
        await daemon.execute("query-version")


async def test_command_error_carries_the_qmp_class() -> None:
    async with StorageDaemon("t") as daemon:
        with pytest.raises(DaemonCommandFailed) as failure:
            await daemon.execute("blockdev-del", {"node-name": "nope"})
        assert failure.value.qmp_class == "GenericError"
        assert "nope" in failure.value.qmp_desc
    assert not qsd_children()


async def test_events_arrive_through_listen() -> None:
    async with StorageDaemon("t") as daemon:
        with daemon.listen("JOB_STATUS_CHANGE") as events:
            await daemon.execute("blockdev-add", {"driver": "null-co", "node-name": "a", "size": 1 << 20})
            await daemon.execute("blockdev-add", {"driver": "null-co", "node-name": "b", "size": 1 << 20})
            await daemon.execute(
                "blockdev-backup", {"job-id": "j", "device": "a", "target": "b", "sync": "full"}
            )
            async with asyncio.timeout(10):
                statuses = []
                while "concluded" not in statuses:
                    event = await daemon.next_event(events)
                    assert event is not None
                    statuses.append(event["data"]["status"])
        assert await daemon.next_event(events, timeout_s=0.1) is None
        assert statuses[0] == "created"


async def test_a_killed_daemon_is_reported_as_died() -> None:
    async with StorageDaemon("victim") as daemon:
        assert daemon.pid is not None
        os.kill(daemon.pid, signal.SIGKILL)
        with pytest.raises(DaemonDied) as failure:
            async with asyncio.timeout(10):
                await daemon.execute("query-version")
        assert "victim" in failure.value.description
        assert "SIGKILL" in failure.value.description
    assert not qsd_children()


async def test_stop_kills_a_daemon_that_ignores_quit() -> None:
    daemon = StorageDaemon("frozen")
    await daemon.start()
    assert daemon.pid is not None
    os.kill(daemon.pid, signal.SIGSTOP)
    started = time.monotonic()
    await daemon.stop(timeout_s=1.0)
    assert time.monotonic() - started < 5
    assert not psutil.pid_exists(daemon.pid)


async def test_cancelled_stop_still_kills_and_reraises() -> None:
    daemon = StorageDaemon("frozen")
    await daemon.start()
    assert daemon.pid is not None
    os.kill(daemon.pid, signal.SIGSTOP)
    stopping = asyncio.create_task(daemon.stop(timeout_s=2.0))
    await asyncio.sleep(0.2)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert not psutil.pid_exists(daemon.pid)
    assert not qsd_children()


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.003, 0.006, 0.01, 0.02])
async def test_cancelled_start_leaves_no_daemon(delay: float) -> None:
    daemon = StorageDaemon("t")
    starting = asyncio.create_task(daemon.start())
    await asyncio.sleep(delay)
    starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        assert not qsd_children()  # cancelled part way: nothing left behind
    else:
        assert daemon.running  # it was already up when the cancel came
    await daemon.stop()
    assert not qsd_children()


async def test_a_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(DaemonError, match="not installed"):
        await StorageDaemon("t", binary="no-such-qemu-storage-daemon").start()


async def test_daemon_dies_with_the_agent() -> None:
    """setpriv --pdeathsig: an agent killed with SIGKILL takes its daemons along."""
    script = (
        "import asyncio, sys\n"
        "from agent.transfer.qsd import StorageDaemon\n"
        "async def main():\n"
        "    d = StorageDaemon('orphan')\n"
        "    await d.start()\n"
        "    print(d.pid, d.workdir, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert agent.stdout is not None
        async with asyncio.timeout(20):
            pid, workdir = (await agent.stdout.readline()).decode().split()
        daemon = psutil.Process(int(pid))
        assert daemon.is_running()
    finally:
        agent.kill()
        await agent.wait()
    with contextlib.suppress(psutil.NoSuchProcess):
        await asyncio.to_thread(daemon.wait, 10)
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE
    shutil.rmtree(workdir)  # nobody was left to remove it: the agent was killed
