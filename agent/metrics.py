"""Prometheus metrics of one agent (``GET /metrics``), in a registry of its own (one per app, so tests and
several apps in one process never share counters).

The module knows nothing of tasks: callers feed it numbers, and ``set_task_counts`` gives it a function that
counts tasks by state at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
_DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _TaskStates(Collector):
    def __init__(self) -> None:
        self.count: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("kvm_agent_tasks", "Tasks known to the agent, by state", labels=["state"])
        for state, count in sorted(self.count().items()):
            family.add_metric([state], count)
        yield family


class AgentMetrics:
    """The agent's metrics; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._states = _TaskStates()
        self.registry.register(self._states)
        self.bytes_moved = Counter(
            "kvm_agent_migration_bytes",
            "Bytes moved by migrations (disks and memory)",
            registry=self.registry,
        )
        self.duration = Histogram(
            "kvm_agent_migration_duration_seconds",
            "Run time of finished migrations, from the first step to the final state",
            labelnames=["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.downtime = Histogram(
            "kvm_agent_migration_downtime_seconds",
            "Measured switchover pause of finished migrations",
            buckets=_DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.report_failures = Counter(
            "kvm_agent_report_failures",
            "Reports to the management plane that failed (each attempt)",
            labelnames=["kind"],
            registry=self.registry,
        )

    def set_task_counts(self, count: Callable[[], Mapping[str, int]]) -> None:
        self._states.count = count

    def add_bytes(self, moved: int) -> None:
        if moved > 0:
            self.bytes_moved.inc(moved)

    def task_finished(self, outcome: str, duration_s: float | None, downtime_ms: int | None) -> None:
        if duration_s is not None and duration_s >= 0:
            self.duration.labels(outcome=outcome).observe(duration_s)
        if downtime_ms is not None and downtime_ms >= 0:
            self.downtime.observe(downtime_ms / 1000.0)

    def report_failed(self, kind: str) -> None:
        self.report_failures.labels(kind=kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
