"""The guests' write counters sampled before anyone asks (``WriteHistory``): what is kept, what is
forgotten, and a sampling loop that outlives libvirtd restarts."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import Code, VirtError
from agent.virt.writes import WriteHistory, WriteSample

VM, OTHER = "vm-1", "vm-2"


class Counters:
    """``all_block_writes`` of a fake host: a list of answers, each a mapping or an error to raise."""

    def __init__(self, *answers: dict[str, dict[str, int]] | VirtError) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.answered = asyncio.Event()  # the first counters were handed out

    async def all_block_writes(self) -> dict[str, dict[str, int]]:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, VirtError):
            raise answer
        self.answered.set()
        return answer


def history(keep_s: float = 5.0) -> WriteHistory:
    return WriteHistory(Counters(), keep_s=keep_s)  # type: ignore[arg-type]


def test_keeps_the_last_seconds_of_every_running_vm() -> None:
    kept = history(keep_s=5.0)
    for t in range(8):
        kept.add(float(t), {VM: {"vda": 100 * t, "vdb": 0}, OTHER: {"vda": t}})
    assert [s.at for s in kept.samples(VM, ["vda"])] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert kept.samples(VM, ["vda", "vdb"])[-1] == WriteSample(7.0, {"vda": 700, "vdb": 0})
    assert kept.samples(VM, ["vdc"]) == []  # a disk it never saw


def test_forgets_a_vm_that_stopped_and_starts_over_when_a_counter_goes_down() -> None:
    kept = history()
    kept.add(0.0, {VM: {"vda": 500}, OTHER: {"vda": 1}})
    kept.add(1.0, {VM: {"vda": 600}})
    assert kept.samples(OTHER, ["vda"]) == []
    kept.add(2.0, {VM: {"vda": 10}})  # restarted: its counters began again
    assert kept.samples(VM, ["vda"]) == [WriteSample(2.0, {"vda": 10})]


async def test_the_loop_samples_until_stopped_and_waits_out_an_unreachable_libvirtd(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gone = VirtError("libvirtd went away", code=Code.LIBVIRT_UNREACHABLE)
    host = Counters(gone, gone, {VM: {"vda": 1}})
    kept = WriteHistory(host, every_s=0.01)  # type: ignore[arg-type]
    kept.start()
    async with asyncio.timeout(5):
        await host.answered.wait()
    await asyncio.sleep(0)  # the loop takes the answer in
    assert kept.samples(VM, ["vda"])
    await kept.stop()
    calls = host.calls
    await asyncio.sleep(0.05)
    assert host.calls == calls  # stopped for good
    # Said once, not once a round.
    assert [r.getMessage() for r in caplog.records].count(
        "guest write counters not sampled: libvirtd went away"
    ) == 1
