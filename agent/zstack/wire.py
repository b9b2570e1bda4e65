"""The ZStack agent dialect on the wire: command bodies, answer and progress shapes, the time budget rule.

Facts from ZStack's public sources (``zstacklib/utils/http.py`` and ``progress_report.py``, the Java
``KVMAgentCommands``):
- asynchronous calls carry headers ``taskuuid`` and ``callbackurl``; the agent answers 200 with an empty body
  at once, later POSTs ``{"success", "error": "<message>", ...}`` to ``callbackurl`` with header ``taskuuid``;
- every command body has ``threadContext`` (``api``, ``task-name``, ``task-stage`` like ``"0-90"``),
  ``threadContextStack``, ``taskContext`` (``__messagetimeout__`` and ``__messagedeadline__``, epoch ms as
  strings) and ``kvmHostAddons``; a command with 60 s or less left is refused ("timeout[N] is too short");
- progress goes to the ``sendCommandUrl`` learned from ``/host/connect`` with header ``commandpath:
  /progress/report``; the percent is an integer string mapped into the ``task-stage`` range.

Command models ignore fields they do not use: ZStack adds fields from release to release.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TASK_UUID_HEADER = "taskuuid"
CALLBACK_URL_HEADER = "callbackurl"
COMMAND_PATH_HEADER = "commandpath"
PROGRESS_COMMAND_PATH = "/progress/report"
#: ZStack refuses a command with this much time left or less (``progress_report.get_timeout``).
MIN_REMAINING_S = 60
#: What a ``taskuuid`` header may look like (ZStack sends 32 hex); it also names a file on disk.
TASK_UUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")

#: ``processType`` of progress reports, by command.
MIGRATE = "MigrateVm"
BLOCK_COPY = "blockCopy"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Command(_Wire):
    """What every ZStack agent command carries."""

    threadContext: dict[str, Any] = Field(default_factory=dict)
    threadContextStack: list[Any] = Field(default_factory=list)
    taskContext: dict[str, Any] = Field(default_factory=dict)
    kvmHostAddons: dict[str, Any] = Field(default_factory=dict)

    @property
    def api_id(self) -> str | None:
        api = self.threadContext.get("api")
        return str(api) if api else None


class VolumeTO(_Wire):
    installPath: str = Field(max_length=4096)
    volumeUuid: str | None = Field(default=None, max_length=64)
    deviceType: str = "file"
    format: str | None = None
    type: str | None = None  # Root | Data
    cacheMode: str | None = None
    wwn: str | None = None


class MigrateVmCmd(Command):
    """``/vm/migrate``: live migration to another host; ``disks`` maps old install path -> new volume."""

    vmUuid: str
    destHostIp: str = Field(max_length=255)
    destHostManagementIp: str | None = Field(default=None, max_length=255)
    srcHostIp: str | None = None
    storageMigrationPolicy: Literal["FullCopy", "IncCopy"] | None = None
    disks: dict[str, VolumeTO] = Field(default_factory=dict)
    bandwidth: int | None = Field(default=None, ge=0)  # MiB/s, the whole budget; 0 or null = uncapped
    downTime: int | None = None  # ms
    autoConverge: bool = False
    xbzrle: bool = False
    reload: bool = False
    useNuma: bool = False
    migrateFromDestination: bool = False
    timeout: int | None = None  # s


class BlockLiveMigrationCmd(Command):
    """``/vm/blklivemigration``: move one volume of a running VM on this host onto ``newVolume``."""

    vmUuid: str
    oldVolumePath: str = Field(max_length=4096)
    newVolume: VolumeTO
    bandwidth: int | None = Field(default=None, ge=0)  # MiB/s; 0 or null = uncapped
    reload: bool = False


class CancelCmd(Command):
    """``/job/cancel``: cancel the running commands whose ``threadContext.api`` matches."""

    cancellationApiId: str
    times: int | None = None
    interval: int | None = None


class PingCmd(Command):
    hostUuid: str | None = None


class ConnectCmd(Command):
    hostUuid: str | None = None
    sendCommandUrl: str | None = None


def remaining_s(task_context: dict[str, Any], now: float) -> float | None:
    """Seconds left by ``taskContext``: min of the message timeout and deadline - now; None when absent."""
    limits: list[float] = []
    timeout = task_context.get("__messagetimeout__")
    deadline = task_context.get("__messagedeadline__")
    try:
        if timeout not in (None, ""):
            limits.append(int(str(timeout)) / 1000)
        if deadline not in (None, ""):
            limits.append(int(str(deadline)) / 1000 - now)
    except ValueError:
        return None
    return min(limits) if limits else None


def stage_range(thread_context: dict[str, Any]) -> tuple[int, int]:
    """``task-stage`` "start-end" (percent of the whole API this command covers); 0-100 when absent."""
    stage = thread_context.get("task-stage")
    if not stage:
        return 0, 100
    try:
        start, end = (int(part) for part in str(stage).split("-", 1))
    except ValueError:
        return 0, 100
    return start, end


def staged_percent(percent: float, thread_context: dict[str, Any], *, done: bool) -> int:
    """ZStack's ``get_exact_percent``: the percent (capped at 99 until done) mapped into the stage range."""
    start, end = stage_range(thread_context)
    capped = 100.0 if done else min(float(percent), 99.0)
    return int(capped / 100 * (end - start) + start)


def answer(success: bool, error: str | None = None, **fields: Any) -> dict[str, Any]:
    """An agent response: ``{"success", "error", ...fields}``."""
    return {"success": success, "error": error, **fields}


def error_message(error: dict[str, Any] | None) -> str:
    """One line for ZStack's ``error`` string from an agent ErrorCode body."""
    if not error:
        return "the task failed"
    text = f"{error.get('code')}: {error.get('description')}"
    if error.get("details"):
        text += f"; {error['details']}"
    return text


def progress_body(
    *,
    percent: int,
    process_type: str,
    server_uuid: str,
    done: int,
    total: int,
    speed: float | None,
    eta: float | None,
    thread_context: dict[str, Any],
    thread_context_stack: list[Any],
) -> dict[str, Any]:
    return {
        "progress": str(percent),
        "processType": process_type,
        "serverUuid": server_uuid,
        "detail": {
            "remain": max(0, total - done),
            "total": total,
            "speed": int(speed or 0),
            "remaining_migration_time": None if eta is None else int(eta),
        },
        "threadContextMap": thread_context,
        "threadContextStack": thread_context_stack,
    }
