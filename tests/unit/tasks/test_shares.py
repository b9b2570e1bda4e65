"""How the host-wide budget is shared (``tasks.shares.split``): floors, converging first, weights, caps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.tasks.shares import FLOOR_SHARE, Claim, split

MiB = 1024 * 1024
BUDGET = 40 * MiB


def test_equal_priorities_share_equally_and_use_the_whole_budget() -> None:
    shares = split(BUDGET, [Claim(name, weight=10) for name in "abcd"])
    assert set(shares) == set("abcd")
    assert max(shares.values()) - min(shares.values()) <= 4
    assert BUDGET - 4 <= sum(shares.values()) <= BUDGET


def test_weights_split_in_proportion_and_a_tasks_own_cap_is_its_bound() -> None:
    shares = split(BUDGET, [Claim("low", weight=10), Claim("high", weight=30)])
    floor = int(BUDGET * FLOOR_SHARE / 2)  # the same for both; above it, by weight
    assert abs((shares["high"] - floor) - 3 * (shares["low"] - floor)) <= 4
    # A task capped below its fair part gets its cap; what it leaves goes to the others by weight.
    shares = split(BUDGET, [Claim("capped", weight=10, bound=4 * MiB), Claim("a", 10), Claim("b", 10)])
    assert shares["capped"] == 4 * MiB
    assert abs(shares["a"] - shares["b"]) <= 2 and shares["a"] > 17 * MiB
    # Every task bounded below the budget: the rest stays unused.
    shares = split(BUDGET, [Claim("a", 10, bound=5 * MiB), Claim("b", 10, bound=6 * MiB)])
    assert shares == {"a": 5 * MiB, "b": 6 * MiB}


def test_every_task_keeps_a_floor_however_small_its_weight() -> None:
    shares = split(BUDGET, [Claim("tiny", weight=1), Claim("huge", weight=100)])
    assert shares["tiny"] >= int(BUDGET * FLOOR_SHARE / 2)  # never 0: QEMU reads a speed of 0 as no limit
    assert sum(shares.values()) >= BUDGET - 4


claims = st.lists(
    st.builds(
        Claim,
        st.uuids().map(str),
        weight=st.integers(1, 100),
        bound=st.none() | st.integers(1, 200 * MiB),
    ),
    max_size=12,
    unique_by=lambda c: c.task_uuid,
)


@given(budget=st.integers(1 * MiB, 1000 * MiB), claims=claims)
def test_the_shares_never_exceed_the_budget_nor_a_tasks_cap_and_none_is_zero(
    budget: int, claims: list[Claim]
) -> None:
    shares = split(budget, claims)
    assert set(shares) == {c.task_uuid for c in claims}
    assert sum(shares.values()) <= budget
    for claim in claims:
        assert shares[claim.task_uuid] >= 1
        if claim.bound is not None:
            assert shares[claim.task_uuid] <= claim.bound
