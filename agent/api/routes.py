"""The route table: one list drives both the aiohttp router and the OpenAPI document.

Each ``Route`` names its handler, the request body model (if any), the answer model and status, and the
role its caller needs (``agent.api.access``: public, management, or peer for the agent-to-agent paths).
``openapi_document()`` turns the table plus the pydantic models' JSON schemas into an OpenAPI 3.1 document
(``GET /v1/openapi.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

import agent
from agent.api import (
    budget_handlers,
    evacuation_handlers,
    events,
    incoming_handlers,
    info_handlers,
    models,
    task_handlers,
)
from agent.api.access import Role
from agent.api.keys import ROUTE_ROLES
from agent.api.middleware import json_response
from agent.evacuation import EvacuationCancel, EvacuationRequest
from agent.migration.incoming import IncomingSpec
from agent.migration.request import HostBudgetChange, MigrationRequest, Tuning

#: The errors of a path that names one VM, task or incoming migration: a malformed uuid, an unknown one.
_NAMED = (400, 401, 404, 503)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    status: int = 200
    role: Role = Role.MANAGEMENT
    errors: tuple[int, ...] = (401, 503)
    content_type: str = "application/json"
    query: tuple[str, ...] = field(default=())


async def openapi(request: web.Request) -> web.StreamResponse:
    return json_response(openapi_document())


def _on_task(method: str, suffix: str, handler: Handler, summary: str, **options: Any) -> Route:
    """A route on one task; it answers with the task's view."""
    options.setdefault("errors", _NAMED)
    return Route(
        method, f"/v1/tasks/{{taskUuid}}{suffix}", handler, summary, answer=models.TaskView, **options
    )


def _from_peer(method: str, suffix: str, handler: Handler, summary: str, **options: Any) -> Route:
    """Agent to agent: the destination side of a migration, under ``/v1/incoming-migrations``."""
    return Route(
        method,
        f"/v1/incoming-migrations{suffix}",
        handler,
        f"Agent to agent: {summary}",
        role=Role.PEER,
        **options,
    )


_INFO = (
    Route(
        "GET",
        "/v1/health",
        info_handlers.health,
        "Liveness; no token needed",
        answer=models.Health,
        role=Role.PUBLIC,
        errors=(503,),
    ),
    Route(
        "GET",
        "/v1/host",
        info_handlers.host,
        "Host facts: cpu, memory, storage roots",
        answer=models.HostView,
    ),
    Route(
        "GET",
        "/v1/host/budget",
        budget_handlers.get_budget,
        "The host-wide budget: outgoing bandwidth, moves at once, each running task's share",
        answer=models.HostBudgetView,
    ),
    Route(
        "PATCH",
        "/v1/host/budget",
        budget_handlers.change_budget,
        "Change the host-wide budget from now on (until the agent starts again)",
        body=HostBudgetChange,
        answer=models.HostBudgetView,
        errors=(400, 401, 413, 503),
    ),
    Route(
        "GET",
        "/v1/vms",
        info_handlers.list_vms,
        "VMs on this host",
        answer=models.VmList,
        errors=(401, 502, 503),
    ),
    Route(
        "GET",
        "/v1/vms/{vmUuid}",
        info_handlers.describe_vm,
        "One VM with its disks and backing chains",
        answer=models.VmView,
        errors=(*_NAMED, 502),
    ),
)
_TASKS = (
    Route(
        "POST",
        "/v1/vms/{vmUuid}/storage-migrations",
        task_handlers.start_migration,
        "Move the VM's storage (same taskUuid twice gives the same task); headers taskuuid and "
        "callbackurl are accepted too",
        body=MigrationRequest,
        answer=models.TaskView,
        status=202,
        errors=(*_NAMED, 408, 409, 413),
    ),
    Route(
        "GET",
        "/v1/tasks",
        task_handlers.list_tasks,
        "Tasks of this agent",
        answer=models.TaskList,
        errors=(400, 401, 503),
        query=("state", "vmUuid"),
    ),
    _on_task("GET", "", task_handlers.get_task, "One task"),
    _on_task(
        "PATCH",
        "",
        task_handlers.retune_task,
        "Retune a running task",
        body=Tuning,
        errors=(*_NAMED, 409, 413),
    ),
    _on_task(
        "POST",
        "/cancel",
        task_handlers.cancel_task,
        "Cancel (idempotent); the VM keeps its source volumes",
        status=202,
    ),
    _on_task(
        "GET",
        "/events",
        events.task_events,
        "Server-sent events: the task view after each change (event: state | progress); ends after a "
        "final state",
        content_type="text/event-stream",
    ),
)
_EVACUATIONS = (
    Route(
        "POST",
        "/v1/host/evacuations",
        evacuation_handlers.start_evacuation,
        "Move many VMs off this host as one operation (each VM a task of its own; same evacuationUuid "
        "twice gives the same evacuation)",
        body=EvacuationRequest,
        answer=models.EvacuationView,
        status=202,
        errors=(400, 401, 404, 409, 413, 503),
    ),
    Route(
        "GET",
        "/v1/host/evacuations",
        evacuation_handlers.list_evacuations,
        "Evacuations of this agent",
        answer=models.EvacuationList,
    ),
    Route(
        "GET",
        "/v1/host/evacuations/{evacuationUuid}",
        evacuation_handlers.get_evacuation,
        "One evacuation: its progress (VMs done, bytes, ETA) and each VM's task and verdict",
        answer=models.EvacuationView,
        errors=_NAMED,
    ),
    Route(
        "POST",
        "/v1/host/evacuations/{evacuationUuid}/cancel",
        evacuation_handlers.cancel_evacuation,
        "Cancel (idempotent): the VMs not started never start; the running ones finish, or roll back "
        "with running: rollback",
        body=EvacuationCancel,
        answer=models.EvacuationView,
        errors=(*_NAMED, 413),
    ),
)
_INCOMING = (
    _from_peer(
        "GET",
        "",
        incoming_handlers.offer,
        "this host's uuid and storage roots (what a source plans a move here with)",
    ),
    _from_peer(
        "POST",
        "",
        incoming_handlers.prepare,
        "prepare this host to receive a VM's volumes (targets created, space checked)",
        body=IncomingSpec,
        status=201,
        errors=(400, 401, 409, 503),
    ),
    _from_peer(
        "GET", "/{migrationId}", incoming_handlers.get, "one prepared incoming migration", errors=_NAMED
    ),
    _from_peer(
        "GET",
        "/{migrationId}/vm",
        incoming_handlers.vm,
        "the migration's VM with its disks as this host sees it (also after the migration settled)",
        answer=models.VmView,
        errors=(*_NAMED, 502),
    ),
    _from_peer(
        "POST",
        "/{migrationId}/commit",
        incoming_handlers.commit,
        "the VM arrived; check it runs from the new paths",
        errors=_NAMED,
    ),
    _from_peer(
        "POST",
        "/{migrationId}/layers",
        incoming_handlers.open_layer,
        "create a lower chain layer and export it (NBD over TLS-PSK) for the source to fill",
        body=incoming_handlers.LayerRef,
        status=201,
        errors=(*_NAMED, 409),
    ),
    _from_peer(
        "POST",
        "/{migrationId}/layers/finish",
        incoming_handlers.finish_layer,
        "close a layer's export and verify it against the source's digest",
        body=incoming_handlers.LayerDone,
        errors=_NAMED,
    ),
    _from_peer(
        "POST",
        "/{migrationId}/define",
        incoming_handlers.define,
        "offline move: define the VM on this host from its transferred images",
        body=incoming_handlers.Definition,
        errors=(*_NAMED, 409),
    ),
    _from_peer(
        "DELETE",
        "/{migrationId}",
        incoming_handlers.abort,
        "remove what the incoming migration created (idempotent)",
        errors=(400, 401, 409, 503),
    ),
)
_DOCUMENTS = (
    Route("GET", "/v1/openapi.json", openapi, "This document"),
    Route("GET", "/metrics", info_handlers.metrics, "Prometheus metrics", content_type="text/plain"),
)
#: The agent's routes, in the order the OpenAPI document lists them.
ROUTES: tuple[Route, ...] = (*_INFO, *_TASKS, *_EVACUATIONS, *_INCOMING, *_DOCUMENTS)


def add_routes(app: web.Application) -> None:
    app[ROUTE_ROLES] = {(route.method, route.path): route.role for route in ROUTES}
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 from ``ROUTES`` and the models' JSON schemas (``$defs`` lifted into components)."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_ref = ref(models.ErrorCode)
    for extra in (models.CallbackBody, models.ProgressReportBody):
        ref(extra)
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": {},
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
            for name in _path_params(route.path)
        ]
        parameters += [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in route.query
        ]
        if route.method == "POST" and route.body is MigrationRequest:
            parameters += [
                {"name": "taskuuid", "in": "header", "required": False, "schema": {"type": "string"}},
                {"name": "callbackurl", "in": "header", "required": False, "schema": {"type": "string"}},
            ]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(route.body)}},
            }
        answer_schema: dict[str, Any] = ref(route.answer) if route.answer is not None else {}
        operation["responses"][str(route.status)] = {
            "description": route.summary,
            "content": {route.content_type: {"schema": answer_schema}},
        }
        # Any body can be too large (the app's client_max_size answers 413 before a handler runs).
        statuses = (*route.errors, 413) if route.body is not None else route.errors
        if route.role in (Role.MANAGEMENT, Role.PEER):
            statuses = (*statuses, 403)  # a known caller of the other role (agent.api.access)
        if route.role is Role.PEER:
            statuses = (*statuses, 429)  # a limit of the destination is full (Retry-After)
        for status in sorted(set(statuses)):
            operation["responses"][str(status)] = {
                "description": "ErrorCode",
                "content": {"application/json": {"schema": error_ref}},
            }
        if route.role is not Role.PUBLIC:
            operation["security"] = [{"bearer": []}]
        else:
            operation["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvm-storage-agent",
            "version": agent.__version__,
            "description": "Moves running KVM virtual machines' storage; errors are ZStack ErrorCode bodies.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
