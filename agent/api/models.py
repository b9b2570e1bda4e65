"""Response models of the API: the source of the OpenAPI schemas, and checked against real answers in tests.

Handlers build plain dicts (``Task.view()`` and friends); these models describe them. Extra keys are allowed
so the agent can add facts without breaking a strict client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.errors import Code


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorCode(_Open):
    """ZStack's ErrorCode; ``field`` names the offending input for a 400."""

    code: str = Field(
        examples=[Code.STORAGE_NOT_FOUND],
        description="a stable code: " + "; ".join(f"{code.value}: {code.meaning}" for code in Code),
        json_schema_extra={"enum": [code.value for code in Code]},
    )
    description: str
    details: str | None = None
    cause: ErrorCode | None = None
    field: str | None = None


class Progress(_Open):
    percent: float = Field(ge=0, le=100, description="never goes backwards; 100 only once SUCCEEDED")
    bytesDone: int
    bytesTotal: int
    bytesPerSecond: float | None = Field(description="smoothed (EWMA)")
    etaSeconds: float | None


class StateEntry(_Open):
    state: str
    at: str = Field(description="ISO 8601, UTC")
    detail: str | None = None


class ItemProgressView(_Open):
    name: str = Field(description="volume uuid (or disk name) or 'memory'")
    kind: str = Field(examples=["volume", "memory"])
    bytesDone: int
    bytesTotal: int
    percent: float


class TuningView(_Open):
    bandwidth: int | None = Field(description="MiB/s for the whole task; null = uncapped")
    downTime: int = Field(description="ms")


class TaskView(_Open):
    """A task: ``GET /v1/tasks/{taskUuid}``, and the answer of the migration POST, PATCH and cancel."""

    taskUuid: str
    vmUuid: str
    state: str = Field(examples=["PENDING", "COPYING", "SUCCEEDED"])
    phase: str | None
    states: list[StateEntry]
    progress: Progress
    volumes: list[ItemProgressView]
    details: dict[str, Any]
    downtimeMs: int | None
    error: ErrorCode | None
    inventory: dict[str, Any] | None = Field(description="{vmUuid, volumes: [...]} once SUCCEEDED")
    tuning: TuningView
    createdAt: str
    updatedAt: str
    request: dict[str, Any] = Field(description="the accepted request, without any token")


class TaskList(_Open):
    tasks: list[TaskView]


class CallbackBody(_Open):
    """What ``callbackUrl`` receives (header ``taskuuid``): the seed's response shape plus task facts."""

    success: bool
    error: ErrorCode | None
    inventory: dict[str, Any] | None
    taskUuid: str
    vmUuid: str
    state: str
    downtimeMs: int | None


class ProgressReportBody(_Open):
    """What ``progressUrl`` receives (header ``taskuuid``), at most about once a second."""

    taskUuid: str
    vmUuid: str
    state: str
    phase: str | None
    progress: Progress


class Health(_Open):
    status: str
    version: str
    hostUuid: str


class StorageRootView(_Open):
    uuid: str
    path: str
    totalBytes: int | None
    freeBytes: int | None
    error: str | None = None


class HostView(_Open):
    hostUuid: str
    hostname: str
    version: str
    cpu: dict[str, Any]
    memory: dict[str, Any]
    storage: list[StorageRootView]
    tasks: dict[str, int]


class HostBudgetView(_Open):
    outgoing: dict[str, Any]


class EvacuationProgress(_Open):
    vmsTotal: int
    vmsDone: int = Field(description="VMs whose task ended (verdict true or false)")
    vmsSucceeded: int
    bytesDone: int
    bytesTotal: int = Field(description="the tasks' own totals; a VM not started counts as their mean")
    bytesPerSecond: float | None = Field(description="the running tasks together")
    etaSeconds: float | None
    percent: float


class EvacuationVmView(_Open):
    vmUuid: str
    taskUuid: str | None = Field(description="its task (GET /v1/tasks/{taskUuid}) once handed over")
    destination: dict[str, Any] | None = Field(description="{hostUuid, dstPrimaryStorageUuid} once chosen")
    state: str = Field(examples=["WAITING", "COPYING", "SUCCEEDED"])
    verdict: bool | None = Field(description="true: SUCCEEDED; false: FAILED or CANCELLED; null: not ended")
    error: ErrorCode | None


class EvacuationView(_Open):
    """``POST /v1/host/evacuations`` and ``GET /v1/host/evacuations/{evacuationUuid}``."""

    evacuationUuid: str
    state: str = Field(examples=["RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"])
    progress: EvacuationProgress
    vms: list[EvacuationVmView]
    destinations: list[dict[str, Any]]
    createdAt: str
    finishedAt: str | None
    request: dict[str, Any] = Field(description="the accepted request, without any token")


class EvacuationList(_Open):
    evacuations: list[EvacuationView]


class VmList(_Open):
    vms: list[dict[str, Any]]


class VmView(_Open):
    """A VM with its disks and their backing chains (from libvirt and ``qemu-img info --backing-chain``)."""
