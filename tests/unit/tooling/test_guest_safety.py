"""scripts/guest-safety's pure parts: a run's verdict against where the VM runs, what counts as harm, and
the table from the raw rows."""

from __future__ import annotations

from bench.safety import report
from bench.safety.observe import Outcome


def outcome(**changes: object) -> Outcome:
    base = Outcome("auto-kill", 1, "g", "hostA", "hostB", verdict="moved", detail="SUCCEEDED")
    base.runs_on, base.checker_ok_after, base.writes_after, base.downtime_ms = ["hostB"], True, True, 120.0
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_the_verdict_is_true_only_where_the_vm_runs_alone() -> None:
    assert outcome().verdict_true
    assert not outcome(runs_on=["hostA"]).verdict_true
    assert not outcome(runs_on=["hostA", "hostB"]).verdict_true
    assert outcome(verdict="stayed", runs_on=["hostA"]).verdict_true


def test_harm_is_a_stale_page_a_death_or_a_guest_that_stopped() -> None:
    assert not outcome().harmed
    assert outcome(stale_pages=1).harmed
    assert outcome(death_lines=["Kernel panic - not syncing"]).harmed
    assert outcome(checker_ok_after=False).harmed
    assert outcome(writes_after=False).harmed


def test_table_counts_per_cell() -> None:
    rows = [
        outcome().as_json(),
        outcome(run=2, death_lines=["Oops: 0010"], checker_ok_after=False, downtime_ms=200.0).as_json(),
        outcome(cell="fixed50", verdict="stayed", runs_on=["hostA"], downtime_ms=None).as_json(),
    ]
    rows[0]["loadavg"], rows[1]["loadavg"] = [0.5, 0.4, 0.3], [2.25, 1.0, 1.0]
    text = report.table(rows)
    assert "| virsh, fixed 50 ms (b) | 1 | 0 | 1 of 1 | 0 | 0 | 0 | 0 | - | - |" in text
    assert (
        "| agent, auto, source agent SIGKILLed in CONVERGING | 2 | 2 | 2 of 2 | 1 | 0 | 1 | 1 | 160, 200"
        " | 0.5-2.2 |" in text
    )
    assert text.index("fixed 50") < text.index("SIGKILLed")
