"""Conversions between in-memory ``Task`` objects and the journal's ``TaskRecord`` rows.

Kept apart from the manager so the rules for what survives a restart (history, tuning, checkpoint, facts,
the progress floor, the final view) sit in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.errors import AgentError
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState
from agent.tasks.journal import StateRow, TaskRecord
from agent.tasks.task import CurrentTuning, StateChange, Task, iso_time


def new_record(task: Task) -> TaskRecord:
    """The journal row of a task just accepted (full request, token included: a resume needs it)."""
    return TaskRecord(
        uuid=task.uuid,
        vm_uuid=task.vm_uuid,
        request=task.request.model_dump(mode="json"),
        state=task.state,
        created_at=task.created_at,
        updated_at=task.updated_at,
        history=[StateRow(change.state, change.detail, change.at) for change in task.history],
        tuning=task.tuning.to_json(),
    )


def progress_json(task: Task) -> dict[str, Any]:
    """What the journal keeps of the progress: per-item counters and the percent floor."""
    snapshot = task.tracker.snapshot()
    return {
        "percent": snapshot.percent,
        "items": {item.name: [item.done, item.total] for item in snapshot.items},
    }


def task_from_record(record: TaskRecord) -> Task:
    """Rebuild a task from the journal; raises ``AgentError`` when the stored request no longer validates."""
    try:
        request = MigrationRequest.model_validate(record.request)
    except ValueError as err:
        raise AgentError(f"journal record of task {record.uuid} has an unreadable request") from err
    history = [StateChange(row.state, row.at, row.detail) for row in record.history]
    if not history or history[-1].state is not record.state:
        history.append(StateChange(record.state, record.updated_at, None))
    tuning = CurrentTuning(request.migrateVm.bandwidth, request.migrateVm.downTime)
    if record.tuning:
        tuning = CurrentTuning(
            record.tuning.get("bandwidth") or None, int(record.tuning.get("downTime", tuning.downtime_ms))
        )
    task = Task(
        uuid=record.uuid,
        vm_uuid=record.vm_uuid,
        request=request,
        created_at=record.created_at,
        updated_at=record.updated_at,
        history=history,
        tuning=tuning,
        details=dict(record.details or {}),
        resume_data=record.checkpoint,
    )
    task.phase = history[-1].detail or history[-1].state.value.lower()
    task.started_at = next((c.at for c in history if not c.state.waiting), None)
    if record.progress:
        items = record.progress.get("items") or {}
        task.tracker.restore(
            {name: (int(pair[0]), int(pair[1])) for name, pair in items.items()},
            float(record.progress.get("percent", 0.0)),
        )
    if record.result:
        task.error = record.result.get("error")
        task.inventory = record.result.get("inventory")
        task.downtime_ms = record.result.get("downtimeMs")
    downtime = task.details.get("downtimeMs")
    if task.downtime_ms is None and isinstance(downtime, int | float):
        task.downtime_ms = int(downtime)
    if record.state is TaskState.SUCCEEDED:
        task.tracker.mark_complete()
    if record.state.final:
        # Sets the finished event and finished_at without re-adding the entry.
        last = task.history.pop()
        task.apply_state(last)
        task.updated_at = record.updated_at
    return task


def final_view(task: Task, change: StateChange, error: AgentError | None, inventory: Any) -> dict[str, Any]:
    """The task's view as it will be once ``change`` (a final state) is applied; journalled before that."""
    view = task.view()
    view["state"] = change.state.value
    view["phase"] = change.detail or change.state.value.lower()
    view["states"] = [*view["states"], change.to_json()]
    view["error"] = None if error is None else error.to_error_code()
    view["inventory"] = inventory
    view["updatedAt"] = iso_time(change.at)
    if change.state is TaskState.SUCCEEDED:
        snapshot = dataclasses.replace(task.tracker.snapshot(), percent=100.0, eta_seconds=0.0)
        view["progress"] = snapshot.to_json()
    return view


def callback_body(task: Task, view: dict[str, Any]) -> dict[str, Any]:
    """The final report in the seed's response shape ``{success, error, inventory}`` plus task facts."""
    return {
        "success": view["state"] == TaskState.SUCCEEDED.value,
        "error": view["error"],
        "inventory": view["inventory"],
        "taskUuid": task.uuid,
        "vmUuid": task.vm_uuid,
        "state": view["state"],
        "downtimeMs": view["downtimeMs"],
        # Never over the budget silently (issue 16): the real-bytes rate and the guest's write rates.
        **({"overBudget": view["details"]["overBudget"]} if "overBudget" in view.get("details", {}) else {}),
    }
