"""The switchover floor: where ``auto`` starts on a QEMU that harmed TCG guests switched over at 50 ms."""

from __future__ import annotations

import pytest

from agent.migration.convergence import ConvergenceController, ConvergencePolicy, SetDowntime
from agent.migration.convergence.floor import TCG_FLOOR_MS, qemu_version, switchover_floor_ms
from agent.migration.request import Strategy


@pytest.mark.parametrize(
    ("qemu", "domain_type", "floor"),
    [
        ("7.2.22", "qemu", TCG_FLOOR_MS),  # Debian 12's QEMU under TCG: the lab's, harmed at 50 ms
        ("9.2.0", "qemu", TCG_FLOOR_MS),  # not measured: older than the first clean build
        ("10.0.2", "qemu", 0),  # bookworm-backports: 0 harmed of 30 at 50 ms
        ("7.2.22", "kvm", 0),  # KVM: never seen harmed, never measured here
        ("7.2.22", None, 0),
        ("garbage", "qemu", TCG_FLOOR_MS),  # unreadable: taken as old
    ],
)
def test_the_floor_applies_to_tcg_on_qemu_older_than_the_clean_build(
    qemu: str, domain_type: str | None, floor: int
) -> None:
    assert switchover_floor_ms(qemu, domain_type) == floor


def test_qemu_version_reads_numbers_up_to_the_first_non_number() -> None:
    assert qemu_version("7.2.22") == (7, 2, 22)
    assert qemu_version("10.0") == (10, 0)
    assert qemu_version("8.x") == (8,)


def first_downtime(policy: ConvergencePolicy) -> int:
    actions = ConvergenceController(policy).start(0.0)
    return next(a.ms for a in actions if isinstance(a, SetDowntime))


def test_auto_starts_at_the_floor_within_the_requests_downtime() -> None:
    plain = ConvergencePolicy(Strategy.AUTO, 500, False)
    floored = ConvergencePolicy(Strategy.AUTO, 500, False, switchover_floor_ms=300)
    assert first_downtime(plain) == 50
    assert first_downtime(floored) == 300
    # The request's downTime is the user's limit: the floor never goes over it.
    assert first_downtime(ConvergencePolicy(Strategy.AUTO, 120, False, switchover_floor_ms=300)) == 120
    # The other strategies set the request's downTime once, floor or not.
    assert first_downtime(ConvergencePolicy(Strategy.PRECOPY, 80, False, switchover_floor_ms=300)) == 80


def test_the_floor_is_said_in_the_first_decision() -> None:
    actions = ConvergenceController(
        ConvergencePolicy(Strategy.AUTO, 500, False, switchover_floor_ms=300)
    ).start(0)
    notes = [a.message for a in actions if not isinstance(a, SetDowntime)]
    assert any("not under 300 ms" in n and "TCG" in n for n in notes), notes


def test_a_downtime_under_the_floor_is_kept_and_warned_about() -> None:
    actions = ConvergenceController(
        ConvergencePolicy(Strategy.PRECOPY, 50, False, switchover_floor_ms=300)
    ).start(0)
    assert [a.ms for a in actions if isinstance(a, SetDowntime)] == [50]  # the user's limit stands
    notes = [a.message for a in actions if not isinstance(a, SetDowntime)]
    assert any("WARNING" in n and "300 ms" in n for n in notes), notes
    quiet = ConvergenceController(ConvergencePolicy(Strategy.PRECOPY, 50, False)).start(0)
    assert not any("WARNING" in a.message for a in quiet if not isinstance(a, SetDowntime))
