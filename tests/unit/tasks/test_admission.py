"""Admission's own rules (``tasks.admission``): slots, the queue's order, leaving it."""

from __future__ import annotations

import asyncio

from agent.tasks.admission import Admission


async def test_slots_then_the_queue_by_rank_and_a_freed_slot_goes_to_the_head() -> None:
    changes: list[list[str]] = []
    gate = Admission(1, on_change=lambda: changes.append(gate.waiting()))
    await gate.enter("running", gate.rank(priority=10, created_at=0.0))
    assert gate.must_wait()
    order: list[str] = []

    async def wait(name: str, priority: int, created_at: float, resumed: bool = False) -> None:
        await gate.enter(name, gate.rank(priority=priority, created_at=created_at, resumed=resumed))
        order.append(name)
        gate.leave()

    waiters = [
        asyncio.create_task(wait("late", 10, 2.0)),
        asyncio.create_task(wait("early", 10, 1.0)),
        asyncio.create_task(wait("urgent", 90, 3.0)),
        asyncio.create_task(wait("under way", 1, 9.0, resumed=True)),
    ]
    await asyncio.sleep(0)
    assert gate.waiting() == ["under way", "urgent", "early", "late"]
    assert [gate.position(n) for n in ("under way", "urgent", "early", "late", "running")] == [
        1,
        2,
        3,
        4,
        None,
    ]
    gate.leave()
    await asyncio.gather(*waiters)
    assert order == ["under way", "urgent", "early", "late"]
    assert gate.running == 0 and changes[-1] == []


async def test_a_cancelled_waiter_leaves_the_queue_and_hands_on_a_slot_it_was_just_given() -> None:
    gate = Admission(1)
    await gate.enter("running", gate.rank(priority=10, created_at=0.0))
    first = asyncio.create_task(gate.enter("first", gate.rank(priority=10, created_at=1.0)))
    second = asyncio.create_task(gate.enter("second", gate.rank(priority=10, created_at=2.0)))
    await asyncio.sleep(0)
    gate.leave()  # "first" is given the slot...
    first.cancel()  # ...and cancelled before it could take it
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert gate.running == 1 and gate.waiting() == []
    waiting = asyncio.create_task(gate.enter("third", gate.rank(priority=10, created_at=3.0)))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert gate.waiting() == [] and gate.running == 1
