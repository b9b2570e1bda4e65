"""Case 1: same-host move of one volume with ~2 GiB allocated, uncapped: the agent (request to final
callback) against `virsh blockcopy --wait --pivot --transient-job` and `qemu-img convert` of the same data.

Each repetition runs the three side by side (order rotated), each moving the volume to the other storage
root of the host; the agent's copy is followed by deleting the source it leaves for the management plane,
so the next move finds the destination free."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from bench.agentrun import active_tasks, require_clean, run_task
from bench.context import Context, CpuUse
from bench.labenv import (
    DAEMONS,
    BenchError,
    BenchGuest,
    GiB,
    MiB,
    allocated_bytes,
    bench_guest,
    cpu_of,
    measure_again_if_disturbed,
    run,
)
from bench.table import Row, Target
from labkit.bodies import migration_body
from labkit.labview import StorageRoot

log = logging.getLogger(__name__)

AGENT = "agent (request to final callback)"
VIRSH = "virsh blockcopy --wait --pivot"
QEMU_IMG = "qemu-img convert"


def other_root(guest: BenchGuest, path: str) -> StorageRoot:
    here = guest.host.root_of(path).name
    return guest.host.root("ps2" if here == "ps1" else "ps1")


async def _agent_move(ctx: Context, guest: BenchGuest, phases: list[dict[str, float]]) -> float:
    src = guest.sources()["vda"]
    dst = other_root(guest, src)
    busy = await active_tasks(ctx.lab)
    before = cpu_of(guest.host)
    result = await run_task(
        ctx.lab, guest.host, guest.uuid, migration_body(dst.uuid), receiver=ctx.receiver, poll_s=1.0
    )
    after = cpu_of(guest.host)
    guest.drop_unused_files()
    require_clean(result, "the agent's move")
    assert result.elapsed is not None
    moved = int(result.view["progress"]["bytesTotal"])
    used = after.since(before) if after and before else None
    if used is not None:
        ctx.cpu.append(CpuUse("1", "same-host", used[0], used[1], moved, busy))
    times = result.state_times()
    phases.append(
        {
            "preparing": times.get("COPYING", 0) - times.get("PREPARING", 0),
            "copying": times.get("SWITCHING", 0) - times.get("COPYING", 0),
            "switching+verifying": times.get("SUCCEEDED", 0) - times.get("SWITCHING", 0),
            "toCallback": result.elapsed - times.get("SUCCEEDED", result.elapsed),
        }
    )
    return result.elapsed


def _virsh_move(guest: BenchGuest) -> float:
    src = guest.sources()["vda"]
    dst = str(other_root(guest, src).path / f"{guest.name}-{uuid.uuid4().hex[:6]}.qcow2")
    guest.files.add(dst)
    started = time.monotonic()
    guest.host.virsh("blockcopy", guest.name, "vda", dst, "--wait", "--pivot", "--transient-job")
    took = time.monotonic() - started
    if guest.sources()["vda"] != dst:
        raise BenchError(f"virsh blockcopy did not pivot {guest.name} to {dst}")
    guest.drop_unused_files()
    return took


def _convert(guest: BenchGuest) -> float:
    src = guest.sources()["vda"]
    dst = str(other_root(guest, src).path / f"{guest.name}-convert.qcow2")
    started = time.monotonic()
    try:
        run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", src, dst])
        return time.monotonic() - started
    finally:
        if os.path.exists(dst):
            os.unlink(dst)


async def run_case(ctx: Context) -> list[Row]:
    s = ctx.settings
    title = f"same-host move, {s.same_fill_mib / 1024:.1f} GiB allocated (4 GiB virtual), uncapped"
    times: dict[str, list[float]] = {AGENT: [], VIRSH: [], QEMU_IMG: []}
    phases: list[dict[str, float]] = []
    with bench_guest(ctx.lab, "same", fill_mib=s.same_fill_mib, disk_size_mib=4096) as guest:
        allocated = allocated_bytes(guest.sources()["vda"])
        steps: dict[str, Callable[[], Awaitable[float]]] = {
            AGENT: lambda: _agent_move(ctx, guest, phases),
            VIRSH: lambda: asyncio.to_thread(_virsh_move, guest),
            QEMU_IMG: lambda: asyncio.to_thread(_convert, guest),
        }
        names = list(steps)
        for rep in range(s.same_reps):
            order = names[rep % 3 :] + names[: rep % 3]  # rotated: no method always runs first
            for name in order:
                os.sync()  # start each from clean page cache write-back, not behind the previous copy
                watch = DAEMONS if name == AGENT else ("libvirtd",)
                took = await measure_again_if_disturbed(
                    name, steps[name], guest.drop_unused_files, watch=watch
                )
                times[name].append(took)
                log.info("case 1 rep %d: %s %.2f s", rep + 1, name, took)
    ctx.raw["1"] = {"allocatedBytes": allocated, "times": times, "agentPhases": phases}
    phase_note = (
        ", ".join(f"{key} {statistics.median(p[key] for p in phases):.2f} s" for key in phases[0])
        if phases
        else ""
    )
    gib = allocated / GiB
    return [
        Row(
            "1", title, AGENT, "time", "s", times[AGENT],
            baseline=VIRSH, baseline_values=times[VIRSH], target=Target(high=1.10),
            note=f"agent phases (median): {phase_note}; {allocated / MiB:.0f} MiB allocated ({gib:.2f} GiB)",
        ),
        Row("1", title, VIRSH, "time", "s", times[VIRSH], baseline=QEMU_IMG, baseline_values=times[QEMU_IMG]),
        Row("1", title, QEMU_IMG, "time", "s", times[QEMU_IMG]),
        Row(
            "1", title, AGENT, "rate", "MiB/s", [allocated / MiB / t for t in times[AGENT]],
            baseline=QEMU_IMG, baseline_values=[allocated / MiB / t for t in times[QEMU_IMG]],
        ),
    ]  # fmt: skip
