"""Driving the lab's real agents from tests: start a migration, follow it, sample its progress."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from labtools import Lab, LabHost

from labkit.agents import agent_client


@dataclass
class Run:
    """A migration task followed to its end, with progress samples (monotonic time, task view)."""

    task: dict[str, Any]
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def state(self) -> str:
        return str(self.task["state"])

    @property
    def states(self) -> list[str]:
        return [s["state"] for s in self.task["states"]]

    def volumes(self) -> dict[str, dict[str, Any]]:
        inventory = self.task["inventory"]
        vols = inventory["volumes"] if isinstance(inventory, dict) else inventory
        return {v["deviceName"]: v for v in vols}


def assert_progress_honest(run: Run, *, slack: float = 5.0) -> None:
    """The percent never goes backwards, and while the task runs it never runs ahead of the bytes: every
    item's size is announced once the plan is made, so the percent cannot race to 99.9 while later items
    (lower layers, the memory) are still unknown."""
    percents = [v["progress"]["percent"] for _t, v in run.samples]
    assert percents == sorted(percents), f"progress went backwards: {percents}"
    for _t, view in run.samples:
        progress = view["progress"]
        if view["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or not progress["bytesTotal"]:
            continue
        share = 100.0 * progress["bytesDone"] / progress["bytesTotal"]
        assert progress["percent"] <= share + slack, f"{view['state']}: {progress} ahead of its bytes"
    assert run.samples[-1][1]["progress"]["percent"] == (100.0 if run.state == "SUCCEEDED" else percents[-1])


async def start(lab: Lab, host: LabHost, vm_uuid: str, body: dict[str, Any]) -> dict[str, Any]:
    async with agent_client(lab, host) as agent:
        return dict(await agent.start_migration(vm_uuid, body))


async def follow(
    lab: Lab,
    host: LabHost,
    task_uuid: str,
    *,
    within_s: float = 300,
    every: float = 0.25,
    cancel_after: float | None = None,
) -> Run:
    """Poll the task until it ends; optionally cancel it after ``cancel_after`` seconds."""
    samples: list[tuple[float, dict[str, Any]]] = []
    t0 = time.monotonic()
    cancelled = False
    async with agent_client(lab, host) as agent:
        async with asyncio.timeout(within_s):
            while True:
                task = dict(await agent.task(task_uuid))
                samples.append((time.monotonic(), task))
                if task["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    return Run(task, samples)
                if cancel_after is not None and not cancelled and time.monotonic() - t0 > cancel_after:
                    await agent.cancel(task_uuid)
                    cancelled = True
                await asyncio.sleep(every)


async def migrate(lab: Lab, host: LabHost, vm_uuid: str, body: dict[str, Any], **kw: Any) -> Run:
    task = await start(lab, host, vm_uuid, body)
    return await follow(lab, host, task["taskUuid"], **kw)


def qemu_img_chain(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    return data if isinstance(data, list) else [data]


def images_identical(a: str, b: str) -> bool:
    proc = subprocess.run(["qemu-img", "compare", "-U", "-q", a, b], capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def disk_sources(host: LabHost, name: str, *, inactive: bool = False) -> dict[str, str]:
    """target -> source file from `virsh domblklist` (live or persistent definition)."""
    args = ["domblklist", name] + (["--inactive"] if inactive else [])
    rows = host.virsh(*args).splitlines()[2:]
    return {parts[0]: parts[1] for parts in (r.split(None, 1) for r in rows if r.strip()) if len(parts) == 2}
