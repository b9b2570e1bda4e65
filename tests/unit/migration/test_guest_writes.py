"""A copy's guest write rates come from the counters sampled before the request: no pause before the first
byte, unless those samples are too few (``read_guest_writes``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.migration.mirrors import guestwrites
from agent.migration.mirrors.guestwrites import MEASURE_WRITES_S, read_guest_writes
from agent.virt.writes import WriteHistory

VM = "vm-1"
MiB = 1024 * 1024


class Host:
    """``block_writes`` answering the guest's counters, which grow by ``rate`` bytes a second of the clock."""

    def __init__(self, rate: int) -> None:
        self.rate = rate

    async def block_writes(self, vm_uuid: str, disks: list[str]) -> dict[str, int]:
        now = time.monotonic()
        return {d: int(self.rate * now) for d in disks}


def history_from(host: Host, seconds: list[float]) -> WriteHistory:
    """Samples taken ``seconds`` ago."""
    kept = WriteHistory(host)  # type: ignore[arg-type]
    now = time.monotonic()
    for ago in seconds:
        kept.add(now - ago, {VM: {"vda": int(host.rate * (now - ago))}})
    return kept


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(guestwrites.asyncio, "sleep", sleep)
    return waits


async def test_the_rate_comes_from_the_samples_taken_before_without_waiting(slept: list[float]) -> None:
    host = Host(rate=8 * MiB)
    reading = await read_guest_writes(
        host,  # type: ignore[arg-type]
        history_from(host, [3.0, 2.0, 1.0]),
        VM,
        ["vda"],
        with_rate=True,
    )
    assert slept == [] and reading.waited_s == 0
    assert reading.span_s == pytest.approx(3.0, abs=0.1)
    assert reading.rates()["vda"] == pytest.approx(8 * MiB, rel=0.05)
    assert reading.written["vda"] == reading.samples[-1].written["vda"]


async def test_samples_older_than_the_watch_window_or_from_before_a_restart_are_left_out(
    slept: list[float],
) -> None:
    host = Host(rate=MiB)
    kept = history_from(host, [30.0, 2.0])
    kept.add(time.monotonic() - 1.5, {VM: {"vda": 10**15}})  # counters from before the VM started again
    reading = await read_guest_writes(host, kept, VM, ["vda"], with_rate=True)  # type: ignore[arg-type]
    assert [round(time.monotonic() - s.at) for s in reading.samples] == [2, 0]
    assert slept == []


async def test_without_samples_from_before_it_measures_only_what_they_lack(slept: list[float]) -> None:
    host = Host(rate=MiB)
    reading = await read_guest_writes(
        host,  # type: ignore[arg-type]
        history_from(host, [0.5]),
        VM,
        ["vda"],
        with_rate=True,
    )
    assert len(slept) == 1 and slept[0] == pytest.approx(MEASURE_WRITES_S - 0.5, abs=0.05)
    assert reading.waited_s == slept[0] and len(reading.samples) == 3
    reading = await read_guest_writes(host, None, VM, ["vda"], with_rate=True)  # type: ignore[arg-type]
    assert slept[-1] == pytest.approx(MEASURE_WRITES_S, abs=0.05)


async def test_an_uncapped_copy_reads_the_counters_once(slept: list[float]) -> None:
    reading = await read_guest_writes(Host(rate=MiB), None, VM, ["vda"], with_rate=False)  # type: ignore[arg-type]
    assert slept == [] and len(reading.samples) == 1 and reading.rates() == {}
