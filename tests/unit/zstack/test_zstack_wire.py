"""The dialect's small rules: the time budget, the task-stage mapping, the error line."""

from __future__ import annotations

import pytest

from agent.zstack.wire import error_message, remaining_s, staged_percent

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({}, None),
        ({"__messagetimeout__": "300000"}, 300.0),
        ({"__messagetimeout__": "300000", "__messagedeadline__": str(int((NOW + 90) * 1000))}, 90.0),
        ({"__messagetimeout__": "50000", "__messagedeadline__": str(int((NOW + 90) * 1000))}, 50.0),
        ({"__messagedeadline__": str(int((NOW - 5) * 1000))}, -5.0),
        ({"__messagetimeout__": "soon"}, None),
    ],
)
def test_remaining_time_is_the_smaller_of_timeout_and_deadline(
    context: dict[str, str], expected: float | None
) -> None:
    assert remaining_s(context, NOW) == expected


def test_percent_is_capped_until_done_and_mapped_into_the_stage() -> None:
    stage = {"task-stage": "10-90"}
    assert staged_percent(0, stage, done=False) == 10
    assert staged_percent(50, stage, done=False) == 50
    assert staged_percent(99.9, stage, done=False) == 89
    assert staged_percent(99.9, stage, done=True) == 90
    assert staged_percent(42.7, {}, done=False) == 42
    assert staged_percent(100, {"task-stage": "garbage"}, done=False) == 99


def test_error_line() -> None:
    assert error_message({"code": "AGENT.X", "description": "broke", "details": None}) == "AGENT.X: broke"
    assert (
        error_message({"code": "AGENT.X", "description": "broke", "details": "why"}) == "AGENT.X: broke; why"
    )
    assert error_message(None) == "the task failed"
