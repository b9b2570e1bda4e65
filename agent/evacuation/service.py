"""Evacuations: many VMs moved off this host as one operation, each VM a task of its own (issue 24).

An evacuation is a scheduler over the task manager, with a record of its own (``records``):

- at creation every VM gets its ``taskUuid``; the record is journalled before the answer (202);
- a loop (one per unfinished evacuation) hands the VMs to ``TaskManager.submit`` in their order, each to its
  own destination or to the next of ``destinations`` in turn that has room (at most ``incomingMigrations``
  of this evacuation's moves run into one destination host at once; the rest wait, state ``WAITING``).
  The source's own limits still hold: the manager queues moves beyond ``outgoing_migrations`` (QUEUED), and
  the running ones share the host budget (``tasks.hostbudget``);
- a VM is marked submitted in the journal before it is submitted; after a restart a submitted VM whose task
  the manager does not know is submitted again with the same ``taskUuid`` (idempotent);
- each VM's verdict is its task's: true once SUCCEEDED, false once FAILED or CANCELLED;
- ``cancel``: the VMs not started never start (CANCELLED), the tasks still waiting for a slot are cancelled,
  the running ones finish (``running: finish``, the default) or are cancelled and roll back (``rollback``);
- the evacuation ends SUCCEEDED when every VM did, CANCELLED after a cancel, FAILED otherwise.

The progress: VMs done of all, bytes done of the total (the tasks' own; a VM not started yet counts as the
mean of the known ones), the rate of the running tasks together, and an ETA from both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.errors import AgentError, Code, Conflict, InvalidRequest, NotFound, ServiceStopping
from agent.evacuation.records import EvacuationRecords
from agent.evacuation.request import (
    EvacuationCancel,
    EvacuationDestination,
    EvacuationRequest,
    EvacuationVm,
    RunningTasks,
)
from agent.migration.request import MigrationRequest, PrimaryStorageMigrateVm
from agent.migration.states import TaskState
from agent.tasks.hooks import ChangeKind, TaskChange
from agent.tasks.manager import TaskManager
from agent.tasks.task import Task, iso_time
from agent.virt.states import DomainState

log = logging.getLogger(__name__)

#: How often a loop looks at its tasks when nothing woke it (a task's end wakes it at once).
TICK_S = 1.0
#: A VM not handed to the task manager yet.
WAITING = "WAITING"
#: Domain states that count as running for ``vms: "all"``.
LIVE_STATES = frozenset({DomainState.RUNNING, DomainState.PAUSED})
RUNNING, CANCELLING = "RUNNING", "CANCELLING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

ListVms = Callable[[], Awaitable[list[dict[str, Any]]]]


class EvacuationService:
    """Every evacuation of this agent (``start()`` after the manager's, ``stop()`` before it)."""

    def __init__(
        self,
        manager: TaskManager,
        state_dir: Path,
        *,
        host_uuid: str,
        list_vms: ListVms | None,
        clock: Callable[[], float] = time.time,
        tick_s: float = TICK_S,
    ) -> None:
        self._manager = manager
        self._records = EvacuationRecords(state_dir)
        self._host_uuid = host_uuid
        self._list_vms = list_vms
        self._clock = clock
        self._tick_s = tick_s
        self._evacuations: dict[str, dict[str, Any]] = {}
        self._requests: dict[str, EvacuationRequest] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._by_task: dict[str, str] = {}  # task uuid -> evacuation uuid
        self._lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        manager.add_listener(self._task_changed)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the journal: finished evacuations for their views, unfinished ones go on."""
        records = await asyncio.to_thread(self._records.load_all)
        finished = [r for r in records if r.get("state") in FINAL]
        kept = await asyncio.to_thread(self._records.prune, finished)
        for record in [*kept, *(r for r in records if r.get("state") not in FINAL)]:
            try:
                request = EvacuationRequest.model_validate(record["request"])
            except (ValueError, KeyError) as err:
                log.error(
                    "evacuation %s: its request cannot be read back: %s", record.get("evacuationUuid"), err
                )
                continue
            self._adopt(record, request)
            if record["state"] not in FINAL:
                log.info(
                    "evacuation %s: found unfinished (%s), going on",
                    record["evacuationUuid"],
                    record["state"],
                )
                self._start_loop(record["evacuationUuid"])

    async def stop(self) -> None:
        """Stop the loops; the records stay as they are and the next start goes on from them."""
        loops = list(self._loops.values())
        for loop in loops:
            loop.cancel()
        for loop in loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop

    # -- commands ------------------------------------------------------------------------------------------

    async def create(self, request: EvacuationRequest) -> tuple[dict[str, Any], bool]:
        """Check the request, journal the evacuation and start it; ``(view, created)``. The same
        ``evacuationUuid`` with the same request gives the same evacuation (409 with another)."""
        if self._manager.stopping:
            raise ServiceStopping("the agent is stopping; no new evacuations")
        async with self._lock:
            evacuation_uuid = request.evacuationUuid or str(uuidlib.uuid4())
            request = request.model_copy(update={"evacuationUuid": evacuation_uuid})
            known = self._evacuations.get(evacuation_uuid)
            if known is not None:
                if known["request"] != _dump(request):
                    raise Conflict(
                        f"evacuationUuid {evacuation_uuid} is already used by a different request",
                        field="evacuationUuid",
                    )
                return self.view(evacuation_uuid), False
            vms = await self._chosen(request)
            self._check_destinations(request, vms)
            record: dict[str, Any] = {
                "evacuationUuid": evacuation_uuid,
                "createdAt": self._clock(),
                "finishedAt": None,
                "state": RUNNING,
                "cancel": None,
                "request": _dump(request),
                "nextDestination": 0,
                "vms": [
                    {
                        "vmUuid": vm.vmUuid,
                        "taskUuid": str(uuidlib.uuid4()),
                        "destination": None
                        if vm.destination is None
                        else vm.destination.model_dump(mode="json"),
                        "own": vm.destination is not None,
                        "submitted": False,
                        "state": WAITING,
                        "error": None,
                        "bytesDone": 0,
                        "bytesTotal": 0,
                        "downtimeMs": None,
                        "startedAt": None,
                        "finishedAt": None,
                    }
                    for vm in vms
                ],
            }
            await self._save(record)
            self._adopt(record, request)
        log.info(
            "evacuation %s: accepted, %d VMs to %d destinations",
            evacuation_uuid,
            len(vms),
            len(request.destinations) + sum(vm.destination is not None for vm in vms),
        )
        self._start_loop(evacuation_uuid)
        return self.view(evacuation_uuid), True

    async def cancel(self, evacuation_uuid: str, cancel: EvacuationCancel) -> dict[str, Any]:
        """Idempotent; a finished evacuation is returned unchanged."""
        record = self._get(evacuation_uuid)
        if record["state"] in FINAL:
            return self.view(evacuation_uuid)
        if record["cancel"] is None or cancel.running is RunningTasks.ROLLBACK:
            record["cancel"] = cancel.running.value
            record["state"] = CANCELLING
            await self._save(record)
            log.info("evacuation %s: cancel requested (running tasks: %s)", evacuation_uuid, cancel.running)
        await self._apply_cancel(record)
        self._wakes[evacuation_uuid].set()
        return self.view(evacuation_uuid)

    # -- queries -------------------------------------------------------------------------------------------

    def views(self) -> list[dict[str, Any]]:
        return [
            self.view(u) for u in sorted(self._evacuations, key=lambda u: self._evacuations[u]["createdAt"])
        ]

    def view(self, evacuation_uuid: str) -> dict[str, Any]:
        record = self._get(evacuation_uuid)
        request = self._requests[evacuation_uuid]
        now = self._clock()
        vms = [self._vm_view(vm) for vm in record["vms"]]
        done = [v for v in vms if v["verdict"] is not None]
        known = [v["bytesTotal"] for v in vms if v["bytesTotal"]]
        mean = sum(known) / len(known) if known else 0
        unknown = sum(1 for v in vms if not v["bytesTotal"])
        bytes_total = int(sum(known) + mean * unknown)
        bytes_done = sum(v["bytesDone"] for v in vms)
        rate = sum(v["bytesPerSecond"] or 0 for v in vms if v["verdict"] is None) or None
        started = [v["startedAt"] for v in record["vms"] if v["startedAt"]]
        if rate is None and started and bytes_done:
            rate = bytes_done / max(1e-3, (record["finishedAt"] or now) - min(started))
        final = record["state"] in FINAL
        eta = None
        if not final and rate and bytes_total:
            eta = round(max(0, bytes_total - bytes_done) / rate, 1)
        running: dict[str, int] = {}
        for vm in record["vms"]:
            if vm["submitted"] and vm["state"] not in _TASK_FINAL and vm["destination"]:
                host = vm["destination"]["dstHost"]["uuid"]
                running[host] = running.get(host, 0) + 1
        return {
            "evacuationUuid": evacuation_uuid,
            "state": record["state"],
            "cancel": None if record["cancel"] is None else {"running": record["cancel"]},
            "createdAt": iso_time(record["createdAt"]),
            "finishedAt": None if record["finishedAt"] is None else iso_time(record["finishedAt"]),
            "progress": {
                "vmsTotal": len(vms),
                "vmsDone": len(done),
                "vmsSucceeded": sum(1 for v in vms if v["verdict"] is True),
                "vmsFailed": sum(1 for v in vms if v["state"] == FAILED),
                "vmsCancelled": sum(1 for v in vms if v["state"] == CANCELLED),
                "vmsWaiting": sum(1 for v in vms if v["state"] == WAITING),
                "vmsRunning": sum(1 for v in vms if v["state"] not in (WAITING, *_TASK_FINAL)),
                "bytesDone": bytes_done,
                "bytesTotal": bytes_total,
                "bytesTotalEstimated": bool(unknown) and not final,
                "bytesPerSecond": None if rate is None or final else round(rate, 1),
                "etaSeconds": eta,
                "percent": 100.0
                if final and not any(v["verdict"] is False for v in vms)
                else round(100.0 * bytes_done / bytes_total, 1)
                if bytes_total
                else 0.0,
            },
            "destinations": [
                {
                    "hostUuid": d.dstHost.uuid,
                    "dstPrimaryStorageUuid": d.dstPrimaryStorageUuid,
                    "incomingMigrations": d.incomingMigrations,
                    "running": running.get(d.dstHost.uuid, 0),
                }
                for d in request.destinations
            ],
            "vms": vms,
            "request": request.model_dump(
                mode="json",
                exclude={
                    "destinations": {"__all__": {"dstHost": {"token"}}},
                    "vms": {"__all__": {"destination": {"dstHost": {"token"}}}},
                },
            ),
        }

    def _vm_view(self, vm: dict[str, Any]) -> dict[str, Any]:
        task = self._manager.known(vm["taskUuid"]) if vm["submitted"] else None
        state, phase, rate = vm["state"], None, None
        bytes_done, bytes_total, percent = vm["bytesDone"], vm["bytesTotal"], None
        error = vm["error"]
        if task is not None and state not in _TASK_FINAL:
            snapshot = task.tracker.snapshot()
            state, phase, rate = task.state.value, task.phase, snapshot.bytes_per_second
            bytes_done, bytes_total, percent = snapshot.bytes_done, snapshot.bytes_total, snapshot.percent
        if percent is None:
            percent = (
                100.0
                if state == SUCCEEDED
                else (round(100.0 * bytes_done / bytes_total, 1) if bytes_total else 0.0)
            )
        destination = vm["destination"]
        return {
            "vmUuid": vm["vmUuid"],
            "taskUuid": vm["taskUuid"] if vm["submitted"] else None,
            "destination": None
            if destination is None
            else {
                "hostUuid": destination["dstHost"]["uuid"],
                "dstPrimaryStorageUuid": destination["dstPrimaryStorageUuid"],
            },
            "state": state,
            "phase": phase,
            "verdict": True if state == SUCCEEDED else False if state in (FAILED, CANCELLED) else None,
            "bytesDone": bytes_done,
            "bytesTotal": bytes_total,
            "bytesPerSecond": None if rate is None else round(rate, 1),
            "percent": percent,
            "downtimeMs": vm["downtimeMs"],
            "error": error,
            "startedAt": None if vm["startedAt"] is None else iso_time(vm["startedAt"]),
            "finishedAt": None if vm["finishedAt"] is None else iso_time(vm["finishedAt"]),
        }

    # -- checks --------------------------------------------------------------------------------------------

    async def _chosen(self, request: EvacuationRequest) -> list[EvacuationVm]:
        """The VMs the request names (or every live one for ``"all"``), each on this host and free."""
        domains = None if self._list_vms is None else await self._list_vms()
        here = None if domains is None else {str(uuidlib.UUID(d["uuid"])): d for d in domains}
        if request.vms is None:  # "all"
            if here is None:
                raise InvalidRequest('"all" needs libvirt, which this agent is not connected to', field="vms")
            live = [u for u, d in here.items() if DomainState.of(d.get("state")) in LIVE_STATES]
            vms = [EvacuationVm(vmUuid=u) for u in live]
            if not vms:
                raise InvalidRequest("no VM runs on this host", field="vms")
            fields = [f"vms[{u}]" for u in range(len(vms))]
        else:
            vms = request.listed()
            fields = [f"vms[{i}]" for i in range(len(vms))]
        seen: set[str] = set()
        for vm, field in zip(vms, fields, strict=True):
            if vm.vmUuid in seen:
                raise InvalidRequest(f"VM {vm.vmUuid} is named twice", field=field)
            seen.add(vm.vmUuid)
            if here is not None and vm.vmUuid not in here:
                raise NotFound(f"no VM {vm.vmUuid} on this host", field=field, code=Code.VM_NOT_FOUND)
            active = self._manager.active_task_for(vm.vmUuid)
            if active is not None:
                raise Conflict(
                    f"VM {vm.vmUuid} already has task {active.uuid} in state {active.state}",
                    field=field,
                    taskUuid=active.uuid,
                )
            if vm.destination is None and not request.destinations:
                raise InvalidRequest(
                    f"VM {vm.vmUuid} has no destination of its own and destinations is empty",
                    field="destinations",
                )
        return vms

    def _check_destinations(self, request: EvacuationRequest, vms: list[EvacuationVm]) -> None:
        named = [(f"destinations[{i}]", d) for i, d in enumerate(request.destinations)]
        named += [(f"vms[{i}].destination", vm.destination) for i, vm in enumerate(vms) if vm.destination]
        for field, destination in named:
            if destination.dstHost.uuid == self._host_uuid:
                raise InvalidRequest(
                    "an evacuation moves VMs to other hosts; this is the host being evacuated",
                    field=f"{field}.dstHost.uuid",
                )
            if not destination.dstHost.agentUrl:
                raise InvalidRequest(
                    "a move to another host needs the destination's agentUrl",
                    field=f"{field}.dstHost.agentUrl",
                )

    # -- the loop ------------------------------------------------------------------------------------------

    def _adopt(self, record: dict[str, Any], request: EvacuationRequest) -> None:
        uuid = record["evacuationUuid"]
        self._evacuations[uuid] = record
        self._requests[uuid] = request
        self._wakes[uuid] = asyncio.Event()
        for vm in record["vms"]:
            self._by_task[vm["taskUuid"]] = uuid

    def _start_loop(self, evacuation_uuid: str) -> None:
        loop = asyncio.create_task(self._run(evacuation_uuid), name=f"evacuation-{evacuation_uuid}")
        self._loops[evacuation_uuid] = loop
        loop.add_done_callback(lambda done: self._loops.pop(evacuation_uuid, None))

    def _task_changed(self, task: Task, change: TaskChange) -> None:
        if change.kind in (ChangeKind.STATE, ChangeKind.FINISHED):
            evacuation = self._by_task.get(task.uuid)
            if evacuation is not None:
                self._wakes[evacuation].set()

    async def _run(self, evacuation_uuid: str) -> None:
        record = self._evacuations[evacuation_uuid]
        wake = self._wakes[evacuation_uuid]
        try:
            while record["state"] not in FINAL:
                wake.clear()
                changed = await self._observe(record)
                if record["cancel"] is not None:
                    changed |= await self._apply_cancel(record)
                elif not self._manager.stopping:
                    changed |= await self._submit_next(record)
                if all(vm["state"] in _TASK_FINAL for vm in record["vms"]):
                    record["state"] = _outcome(record)
                    record["finishedAt"] = self._clock()
                    changed = True
                    log.info("evacuation %s: %s", evacuation_uuid, record["state"])
                if changed:
                    await self._save(record)
                if record["state"] in FINAL:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick_s):
                        await wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("evacuation %s: its loop failed; it goes on at the next start", evacuation_uuid)
            raise

    async def _observe(self, record: dict[str, Any]) -> bool:
        """Each submitted VM's task: its end into the record (journalled by the caller). A submitted VM the
        manager does not know (the agent stopped between the journal and the submit) is submitted again."""
        changed = False
        for vm in record["vms"]:
            if not vm["submitted"] or vm["state"] in _TASK_FINAL:
                continue
            task = await self._manager.find(vm["taskUuid"])
            if task is None:
                vm["submitted"] = False
                vm["state"] = WAITING
                changed = True
                continue
            if task.state.final:
                snapshot = task.tracker.snapshot()
                vm.update(
                    state=task.state.value,
                    error=task.error,
                    bytesDone=snapshot.bytes_done,
                    bytesTotal=snapshot.bytes_total,
                    downtimeMs=task.downtime_ms,
                    finishedAt=task.finished_at or self._clock(),
                )
                log.info(
                    "evacuation %s: VM %s %s (task %s)",
                    record["evacuationUuid"],
                    vm["vmUuid"],
                    task.state.value,
                    task.uuid,
                )
                changed = True
            elif vm["state"] != task.state.value:
                vm["state"] = task.state.value
        return changed

    async def _submit_next(self, record: dict[str, Any]) -> bool:
        """Hand the waiting VMs, in their order, to the task manager while their destinations have room."""
        request = self._requests[record["evacuationUuid"]]
        changed = False
        for vm in record["vms"]:
            if record["cancel"] is not None:
                break  # cancelled meanwhile (a submit awaits)
            if vm["submitted"] or vm["state"] != WAITING:
                continue
            if vm["own"]:
                destination = EvacuationDestination.model_validate(vm["destination"])
                if self._running_into(record, destination.dstHost.uuid) >= destination.incomingMigrations:
                    continue
            else:
                picked = self._next_destination(record, request)
                if picked is None:
                    continue
                destination = picked
                vm["destination"] = destination.model_dump(mode="json")
            vm["submitted"] = True
            vm["startedAt"] = self._clock()
            await self._save(record)  # before the submit: a restart submits again
            changed = True
            migration = _migration(request, destination, vm["taskUuid"])
            try:
                task, _ = await self._manager.submit(vm["vmUuid"], migration)
            except ServiceStopping:
                return changed  # the next start submits it (same taskUuid)
            except AgentError as err:
                log.warning(
                    "evacuation %s: VM %s was not accepted: %s", record["evacuationUuid"], vm["vmUuid"], err
                )
                vm.update(state=FAILED, error=err.to_error_code(), finishedAt=self._clock())
                continue
            vm["state"] = task.state.value
        return changed

    def _running_into(self, record: dict[str, Any], host_uuid: str) -> int:
        return sum(
            1
            for vm in record["vms"]
            if vm["submitted"]
            and vm["state"] not in _TASK_FINAL
            and vm["destination"] is not None
            and vm["destination"]["dstHost"]["uuid"] == host_uuid
        )

    def _next_destination(
        self, record: dict[str, Any], request: EvacuationRequest
    ) -> EvacuationDestination | None:
        """The next of ``destinations`` in turn whose host has room for one more of this evacuation's
        moves."""
        count = len(request.destinations)
        start = int(record.get("nextDestination", 0))
        for step in range(count):
            index = (start + step) % count
            destination = request.destinations[index]
            if self._running_into(record, destination.dstHost.uuid) < destination.incomingMigrations:
                record["nextDestination"] = (index + 1) % count
                return destination
        return None

    async def _apply_cancel(self, record: dict[str, Any]) -> bool:
        """The VMs not started end CANCELLED; waiting tasks are cancelled, running ones too for a rollback."""
        changed = False
        rollback = record["cancel"] == RunningTasks.ROLLBACK.value
        for vm in record["vms"]:
            if vm["state"] in _TASK_FINAL:
                continue
            if not vm["submitted"]:
                vm.update(state=CANCELLED, finishedAt=self._clock())
                changed = True
                continue
            task = self._manager.known(vm["taskUuid"])
            if task is None or task.state.final or task.state is TaskState.CANCELLING:
                continue
            if rollback or task.state.waiting:
                try:
                    await self._manager.cancel(task.uuid)
                except AgentError as err:
                    log.warning(
                        "evacuation %s: cancelling task %s failed: %s",
                        record["evacuationUuid"],
                        task.uuid,
                        err,
                    )
        return changed

    async def _save(self, record: dict[str, Any]) -> None:
        async with self._save_lock:  # one writer of the records' temporary files at a time
            await asyncio.to_thread(self._records.save, record)

    def _get(self, evacuation_uuid: str) -> dict[str, Any]:
        record = self._evacuations.get(evacuation_uuid)
        if record is None:
            raise NotFound(f"no evacuation {evacuation_uuid}", field="evacuationUuid")
        return record


_TASK_FINAL = frozenset({s.value for s in TaskState if s.final})


def _outcome(record: dict[str, Any]) -> str:
    states = {vm["state"] for vm in record["vms"]}
    if states == {SUCCEEDED}:
        return SUCCEEDED
    return CANCELLED if record["cancel"] is not None else FAILED


def _dump(request: EvacuationRequest) -> dict[str, Any]:
    return request.model_dump(mode="json")


def _migration(
    request: EvacuationRequest, destination: EvacuationDestination, task_uuid: str
) -> MigrationRequest:
    """One VM's move, as ``POST /v1/vms/{vmUuid}/storage-migrations`` would take it."""
    return MigrationRequest(
        primaryStorageMigrateVm=PrimaryStorageMigrateVm(
            dstPrimaryStorageUuid=destination.dstPrimaryStorageUuid,
            withDataVolumes=request.withDataVolumes,
            withSnapshots=request.withSnapshots,
            dstHostUuid=destination.dstHost.uuid,
            strategy=request.strategy,
        ),
        migrateVm=request.migrateVm,
        dstHost=destination.dstHost,
        taskUuid=task_uuid,
        timeout=request.timeout,
        allowPostCopy=request.allowPostCopy,
        priority=request.priority,
    )
