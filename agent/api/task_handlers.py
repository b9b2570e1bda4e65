"""Handlers of the migration and task endpoints (``/v1/vms/{vmUuid}/storage-migrations``, ``/v1/tasks...``).

Checks run in the order a client can fix them: body (400/413), destination (400), VM exists (404), VM busy
(409); ``TaskManager`` then owns the task.
"""

from __future__ import annotations

import uuid as uuidlib

from aiohttp import web

from agent.api.keys import CONFIG, INVENTORY, MANAGER
from agent.api.middleware import json_response
from agent.api.validation import (
    check_destination,
    merge_headers,
    parse_uuid,
    path_uuid,
    read_object,
    validate,
)
from agent.errors import InvalidRequest, NotFound
from agent.migration.request import MigrationRequest, Tuning
from agent.migration.states import TaskState
from agent.report.destinations import check_report_url


async def start_migration(request: web.Request) -> web.StreamResponse:
    """``POST /v1/vms/{vmUuid}/storage-migrations``: 202 with the task view (same taskUuid: same task)."""
    vm_uuid = path_uuid(request, "vmUuid")
    data = await read_object(request)
    merge_headers(data, request)
    migration = validate(MigrationRequest, data)
    if migration.taskUuid is None:
        migration = migration.model_copy(update={"taskUuid": str(uuidlib.uuid4())})
    manager = request.app[MANAGER]
    known = await manager.find(migration.taskUuid or "")
    if known is None:
        config = request.app[CONFIG]
        await check_destination(migration, config)
        for field, url in (("callbackUrl", migration.callbackUrl), ("progressUrl", migration.progressUrl)):
            if url:
                await check_report_url(
                    url, allowed=config.report_networks(), submitter=request.remote, field=field
                )
        inventory = request.app[INVENTORY]
        if inventory is not None:
            await inventory.describe_vm(vm_uuid)  # NotFound -> 404
    task, _created = await manager.submit(vm_uuid, migration)
    return json_response(task.view(), status=202, headers={"Location": f"/v1/tasks/{task.uuid}"})


async def list_tasks(request: web.Request) -> web.StreamResponse:
    """``GET /v1/tasks[?state=S&vmUuid=U]``: every task this agent knows, oldest first."""
    state = None
    if "state" in request.query:
        try:
            state = TaskState(request.query["state"].upper())
        except ValueError as err:
            raise InvalidRequest(f"unknown state {request.query['state']!r}", field="state") from err
    vm_uuid = None
    if "vmUuid" in request.query:
        vm_uuid = parse_uuid(request.query["vmUuid"], "vmUuid")
    tasks = request.app[MANAGER].tasks(state=state, vm_uuid=vm_uuid)
    return json_response({"tasks": [task.view() for task in tasks]})


async def get_task(request: web.Request) -> web.StreamResponse:
    task_uuid = path_uuid(request, "taskUuid")
    task = await request.app[MANAGER].find(task_uuid)
    if task is None:
        raise NotFound(f"no task {task_uuid}", field="taskUuid")
    return json_response(task.view())


async def retune_task(request: web.Request) -> web.StreamResponse:
    """``PATCH /v1/tasks/{taskUuid}`` ``{bandwidth, downTime}``: 200 with the view; 409 unless running."""
    task_uuid = path_uuid(request, "taskUuid")
    tuning = validate(Tuning, await read_object(request))
    if tuning.bandwidth is None and tuning.downTime is None:
        raise InvalidRequest("nothing to change: give bandwidth and/or downTime", field="bandwidth")
    task = await request.app[MANAGER].retune(task_uuid, tuning)
    return json_response(task.view())


async def cancel_task(request: web.Request) -> web.StreamResponse:
    """``POST /v1/tasks/{taskUuid}/cancel``: idempotent; 202 with the view."""
    task_uuid = path_uuid(request, "taskUuid")
    task = await request.app[MANAGER].cancel(task_uuid)
    return json_response(task.view(), status=202)
