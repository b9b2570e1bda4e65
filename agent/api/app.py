"""The aiohttp application: routes, middlewares, and the long-lived resources in ``cleanup_ctx``.

Startup order (teardown runs in reverse): libvirt (optional) and the engine factory -> HTTP client session
for reports -> journal, task manager, outbox deliverer and progress reporter. On shutdown the app first
refuses new work (503) and ends event streams, then the manager *detaches* from running migrations (they keep
running in libvirt and stay unfinished in the journal), then everything is closed.

Tests build the app with ``make_app(config, token=..., engine_factory=fake, inventory=fake_or_None)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
from aiohttp import web

from agent.api.keys import (
    CONFIG,
    CONNECT_LIBVIRT,
    ENGINE_FACTORY,
    EVACUATIONS,
    INCOMING,
    INVENTORY,
    JOURNAL,
    MANAGER,
    METRICS,
    OUTBOX,
    PROGRESS,
    SERVICE,
    SESSION,
    VIRT_HOST,
    ServiceState,
    VmInventory,
)
from agent.api.middleware import error_middleware, guard_middleware
from agent.api.routes import add_routes
from agent.api.wiring import LibvirtInventory, open_virt_host, production_engine_factory
from agent.config import AgentConfig
from agent.evacuation import EvacuationService
from agent.metrics import AgentMetrics
from agent.migration.engine import EngineFactory
from agent.migration.factory import is_same_host
from agent.migration.incoming import IncomingLimits, IncomingService
from agent.report.outbox import OutboxDeliverer
from agent.report.progress import ProgressReporter
from agent.storage.roots import StorageRoots
from agent.tasks.holds import FILE_NAME as HOLDS_FILE
from agent.tasks.holds import PhaseHolds
from agent.tasks.hooks import ChangeKind, TaskChange, TaskListener, unavailable_engine_factory
from agent.tasks.hostbudget import HostBudget
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager
from agent.tasks.task import Task
from agent.virt.writes import WriteHistory

JOURNAL_NAME = "journal.sqlite"


def make_app(
    config: AgentConfig,
    *,
    token: str,
    engine_factory: EngineFactory | None = None,
    inventory: VmInventory | None = None,
    connect_libvirt: bool = False,
    cluster_token: str | None = None,
    dialects: Sequence[Callable[[web.Application], None]] = (),
) -> web.Application:
    """The agent's app. ``connect_libvirt``: open ``config.libvirt_uri`` at startup (production);
    ``cluster_token``: what peer agents present beside their host certificate (``agent.api.access``);
    ``dialects``: other APIs mounted on top (the ZStack one: ``agent.zstack.mount``), handed down by the
    entry point so that imports point one way."""
    app = web.Application(
        client_max_size=config.limits.max_request_bytes,
        middlewares=[error_middleware, guard_middleware],
    )
    app[CONFIG] = config
    app[SERVICE] = ServiceState(token=token, cluster_token=cluster_token or None)
    app[METRICS] = AgentMetrics()
    app[ENGINE_FACTORY] = engine_factory
    app[INVENTORY] = inventory
    app[CONNECT_LIBVIRT] = connect_libvirt
    app[VIRT_HOST] = None
    app[INCOMING] = None
    add_routes(app)
    app.cleanup_ctx.extend([_virt_ctx, _session_ctx, _tasks_ctx])
    for mount in dialects:  # e.g. the ZStack dialect (agent.zstack.mount), after the task manager's ctx
        mount(app)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _virt_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    host = None
    history = None
    if app[CONNECT_LIBVIRT]:
        host = await open_virt_host(config.libvirt_uri)
        app[VIRT_HOST] = host
        # The guests' write counters, sampled from now on so that a capped copy starts without measuring.
        history = WriteHistory(host)
        history.start()
        if app[INVENTORY] is None:
            app[INVENTORY] = LibvirtInventory(host)
    app[INCOMING] = IncomingService(
        StorageRoots.from_config(config),
        host,
        config.state_dir,
        peer_libvirt_uri=config.peer_uri(),
        migration_address=config.migration_host(),
        limits=IncomingLimits(config.limits.incoming_migrations, config.limits.incoming_exports),
    )
    if app[ENGINE_FACTORY] is None:
        app[ENGINE_FACTORY] = (
            production_engine_factory(config, host, history)
            if host is not None
            else unavailable_engine_factory("this agent was started without libvirt")
        )
    # Records an earlier life left behind are settled from what libvirtd says (an owned background task).
    incoming = app[INCOMING]
    reconcile = None
    if host is not None and incoming is not None and incoming.list_ids():
        reconcile = asyncio.create_task(incoming.reconcile(), name="incoming-reconcile")
    try:
        yield
    finally:
        if reconcile is not None:
            reconcile.cancel()
            # A failure was logged by the loop itself when it happened.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reconcile
        if history is not None:
            await history.stop()
        if host is not None:
            await host.close()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=app[CONFIG].report.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[SESSION] = session
        yield


async def _tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    factory = app[ENGINE_FACTORY]
    assert factory is not None  # set by _virt_ctx
    journal = await Journal.open(config.state_dir / JOURNAL_NAME)
    try:
        outbox = OutboxDeliverer(
            journal, app[SESSION], config.report, on_failure=lambda: metrics.report_failed("callback")
        )
        progress = ProgressReporter(
            app[SESSION],
            interval_s=config.report.progress_interval_s,
            timeout_s=config.report.timeout_s,
            on_failure=lambda: metrics.report_failed("progress"),
        )
        manager = TaskManager(
            journal,
            factory,
            outgoing_limit=config.limits.outgoing_migrations,
            holds=PhaseHolds(config.state_dir / HOLDS_FILE),
            host_budget=HostBudget(
                config.limits.host_bandwidth * 1024 * 1024 or None,
                crosses_link=lambda task: not is_same_host(task.request, config),
            ),
        )
        manager.add_listener(metrics_listener(metrics))
        manager.add_listener(report_listener(progress, outbox))
        metrics.set_task_counts(lambda: {s.value: n for s, n in manager.count_by_state().items()})
        app[JOURNAL], app[MANAGER], app[OUTBOX], app[PROGRESS] = journal, manager, outbox, progress
        inventory = app[INVENTORY]
        evacuations = EvacuationService(
            manager,
            config.state_dir,
            host_uuid=config.host_uuid,
            list_vms=None if inventory is None else inventory.list_vms,
        )
        app[EVACUATIONS] = evacuations
        try:
            await manager.start()
            await evacuations.start()
            outbox.start()
            yield
        finally:
            await evacuations.stop()
            await manager.stop(config.shutdown_grace_s / 2)
            await progress.close()
            await outbox.stop()
    finally:
        await journal.close()


async def _on_shutdown(app: web.Application) -> None:
    app[SERVICE].stopping.set()
    if MANAGER in app:
        app[MANAGER].begin_stop()


def metrics_listener(metrics: AgentMetrics) -> TaskListener:
    """Bytes moved on progress; duration and measured downtime when a task ends."""

    def listener(task: Task, change: TaskChange) -> None:
        if change.kind is ChangeKind.PROGRESS:
            metrics.add_bytes(change.bytes_moved)
        elif change.kind is ChangeKind.FINISHED:
            started = task.started_at or task.created_at
            duration = None if task.finished_at is None else task.finished_at - started
            metrics.task_finished(task.state.value.lower(), duration, task.downtime_ms)

    return listener


def report_listener(progress: ProgressReporter, outbox: OutboxDeliverer) -> TaskListener:
    """Progress POSTs for tasks with a ``progressUrl``; wakes the outbox when a final result was written."""

    def listener(task: Task, change: TaskChange) -> None:
        if change.kind is ChangeKind.FINISHED:
            outbox.wake()
            return
        url = task.request.progressUrl
        if url and change.kind in (
            ChangeKind.CREATED,
            ChangeKind.STATE,
            ChangeKind.PHASE,
            ChangeKind.PROGRESS,
        ):
            progress.push(task.uuid, url, task.progress_report, final=task.state.final)

    return listener
