"""Case 7's arithmetic (bench/cases/hotdisk.py): the cap from the guest's measured rate, when a baseline is
stopped, and the guest's writes read from block statistics on whichever host runs it."""

from __future__ import annotations

import math

import pytest

from bench.cases.hotdisk import MiB, cap_for, rate_mib_s, stop_after_s, written_bytes
from bench.labenv import BenchError


def test_cap_is_whole_and_at_least_2_5_times_under_the_rate() -> None:
    assert cap_for(10.5) == 4
    assert cap_for(20.0) == 8
    assert 10.0 / cap_for(10.0) >= 2.5
    with pytest.raises(BenchError, match="premise"):
        cap_for(2.4)


def test_baselines_stop_at_a_multiple_of_the_ideal_time_but_not_before_the_minimum() -> None:
    assert stop_after_s(96 * MiB, 4, 3, 60) == pytest.approx(72.0)
    assert stop_after_s(16 * MiB, 4, 3, 60) == 60


def test_writes_on_one_host() -> None:
    samples = [(float(t), "hostA", 1000 * t) for t in range(11)]
    assert written_bytes(samples, 2.0, 6.0) == (4000.0, 4.0)
    assert rate_mib_s(samples, 0.0, 10.0) == pytest.approx(1000 / MiB)


def test_writes_across_a_migration_count_the_new_qemu_from_zero() -> None:
    # On hostA the counter was at 5000 when the window opened; on hostB a new QEMU counts from zero.
    samples = [(0.0, "hostA", 5000), (1.0, "hostA", 6000), (1.5, "hostB", 0), (2.0, "hostA", 7000)]
    samples += [(3.0, "hostB", 800), (4.0, "hostB", 1800)]
    assert written_bytes(samples, 0.0, 4.0) == (2000.0 + 1800.0, 4.0)


def test_too_few_samples_give_no_rate() -> None:
    assert math.isnan(rate_mib_s([(0.0, "hostA", 1)], 0.0, 1.0))
    assert math.isnan(rate_mib_s([], 0.0, 1.0))
