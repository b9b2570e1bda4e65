"""How one host-wide budget is shared among the tasks that use the host's migration link (pure logic, unit
tested; issue 24).

Rules, in order:

1. Every task gets a floor (``FLOOR_SHARE`` of the budget split equally, at least 1 byte/s): a share of 0
   would read as "no limit" to QEMU, and a task starved of everything never ends.
2. The rest is shared by weight (the request's ``priority``), water-filling: a task capped by its own
   ``bandwidth`` below its fair part gets its cap, and what it leaves goes to the others by their weights.
   A task's own bandwidth is always its upper bound.

The shares never add up to more than the budget; when every task is bounded below it, the rest stays unused.

A converging memory stream is not served before the others: its task's share is all its own then (its disk
mirrors are READY and the pacer gives them only what the guest writes), and taking the others' shares away
for it costs more than it gains. Measured in the lab (tests/lab/test_host_budget.py, QEMU 7.2): cutting the
others to their floor while one task converged and raising them back 0.3 s later put 50 MiB on the link in
a quarter of a second, 1.46 x the budget over 5 s: a mirror job whose speed is raised is woken from the
sleep it owed for its last buffer and sends the next one at once (up to 16 MiB a job).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: This much of the budget is split equally as every task's floor (rule 1).
FLOOR_SHARE = 0.05


@dataclass(frozen=True)
class Claim:
    """One task on the link: its weight and its own cap (bytes/s; None: uncapped)."""

    task_uuid: str
    weight: int
    bound: int | None = None


def split(budget: int, claims: Iterable[Claim]) -> dict[str, int]:
    """Each task's share of ``budget`` bytes/s (see the module docstring)."""
    claims = list(claims)
    if not claims:
        return {}
    floor = max(1, int(budget * FLOOR_SHARE / len(claims)))
    shares = {c.task_uuid: min(floor, _bound(c, budget)) for c in claims}
    for uuid, extra in _water_fill(budget - sum(shares.values()), claims, shares, budget).items():
        shares[uuid] += extra
    return shares


def _bound(claim: Claim, budget: int) -> int:
    return budget if claim.bound is None else min(claim.bound, budget)


def _water_fill(amount: int, claims: list[Claim], given: Mapping[str, int], budget: int) -> dict[str, int]:
    """``amount`` more bytes/s shared by weight among ``claims``, none beyond its bound."""
    room = {c.task_uuid: max(0, _bound(c, budget) - given[c.task_uuid]) for c in claims}
    extra = dict.fromkeys(room, 0)
    open_claims = [c for c in claims if room[c.task_uuid] > 0]
    while amount > 0 and open_claims:
        weights = sum(max(1, c.weight) for c in open_claims)
        fair = {c.task_uuid: amount * max(1, c.weight) // weights for c in open_claims}
        full = [c for c in open_claims if fair[c.task_uuid] >= room[c.task_uuid] - extra[c.task_uuid]]
        if not full:
            for c in open_claims:
                extra[c.task_uuid] += fair[c.task_uuid]
            amount -= sum(fair.values())
            break
        for c in full:  # bounded below their fair part: they take their room, the rest is shared again
            take = room[c.task_uuid] - extra[c.task_uuid]
            extra[c.task_uuid] += take
            amount -= take
        open_claims = [c for c in open_claims if c not in full]
    return extra
