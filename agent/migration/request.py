"""The storage-migration request: ZStack's ``PrimaryStorageMigrateVm`` body plus the agent's own fields.

Field names follow the wire (camelCase). Unknown fields are refused so a typo never silently means a default.
"""

from __future__ import annotations

import enum
import re
import uuid as uuidlib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator


def normalise_uuid(value: str) -> str:
    """Accept dashed or 32-hex uuids (ZStack sends 32 hex); return the dashed form."""
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"{value!r} is not a uuid") from err


Uuid = Annotated[str, Field(min_length=32, max_length=36)]


class Strategy(enum.StrEnum):
    AUTO = "auto"
    PRECOPY = "precopy"
    AUTO_CONVERGE = "auto-converge"
    POSTCOPY = "postcopy"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PrimaryStorageMigrateVm(_Wire):
    dstPrimaryStorageUuid: Uuid
    withDataVolumes: bool = False
    withSnapshots: bool = False
    dstHostUuid: str | None = None
    strategy: Strategy = Strategy.AUTO

    @field_validator("dstPrimaryStorageUuid")
    @classmethod
    def _dst_uuid(cls, value: str) -> str:
        return normalise_uuid(value)

    @field_validator("dstHostUuid")
    @classmethod
    def _host_uuid(cls, value: str | None) -> str | None:
        return normalise_uuid(value) if value else None


#: ``bandwidth`` 0 means "no cap", as in libvirt and ``virsh``: a request keeps None for it, a retune (where
#: None means "unchanged") keeps the 0 and the task's tuning turns it into None.
UNCAPPED = 0


class MigrateVm(_Wire):
    downTime: int = Field(default=300, ge=1, le=600_000, description="acceptable switchover pause, ms")
    bandwidth: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="one budget for the whole task, MiB/s; 0, null or absent = uncapped",
    )

    @field_validator("bandwidth")
    @classmethod
    def _uncapped(cls, value: int | None) -> int | None:
        return None if value == UNCAPPED else value


class DstHost(_Wire):
    uuid: Uuid
    agentUrl: str | None = Field(default=None, max_length=2048)
    migrationAddress: str | None = Field(default=None, max_length=255)
    token: str | None = Field(default=None, max_length=4096, repr=False)

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return normalise_uuid(value)

    @field_validator("agentUrl")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+(/.*)?$", value):
            raise ValueError("must be an http(s) URL")
        return value


class VolumeMapping(_Wire):
    uuid: str | None = Field(default=None, max_length=64)
    installPath: str | None = Field(default=None, max_length=4096)
    dstInstallPath: str | None = Field(default=None, max_length=4096)


#: A request's ``priority`` when it names none.
DEFAULT_PRIORITY = 10


class MigrationRequest(_Wire):
    primaryStorageMigrateVm: PrimaryStorageMigrateVm
    migrateVm: MigrateVm = MigrateVm()
    systemTags: list[str] = Field(default_factory=list, max_length=256)
    userTags: list[str] = Field(default_factory=list, max_length=256)
    dstHost: DstHost | None = None
    taskUuid: str | None = None
    callbackUrl: str | None = Field(default=None, max_length=2048)
    progressUrl: str | None = Field(default=None, max_length=2048)
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds")
    allowPostCopy: bool = False
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        ge=1,
        le=100,
        description="higher goes first: queued tasks are admitted by priority, first come first served "
        "within one",
    )
    volumes: list[VolumeMapping] = Field(default_factory=list, max_length=64)
    targetsPrecreated: bool = Field(
        default=False,
        description="the caller created the target of every disk listed in volumes (dstInstallPath): "
        "exactly those disks move, onto those files, which are checked first (format, virtual size); a flat "
        "target is filled completely, a target with a backing chain gets only the top layer "
        "(withSnapshots) and its chain must already be in place; the agent never removes these files",
    )

    @field_validator("taskUuid")
    @classmethod
    def _task_uuid(cls, value: str | None) -> str | None:
        return normalise_uuid(value) if value else None

    @field_validator("callbackUrl", "progressUrl")
    @classmethod
    def _report_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+(/.*)?$", value):
            raise ValueError("must be an http(s) URL")
        return value

    @property
    def bandwidth_bytes(self) -> int | None:
        bw = self.migrateVm.bandwidth
        return bw * 1024 * 1024 if bw else None


class HostBudgetChange(_Wire):
    """``PATCH /v1/host/budget``: the host-wide limits from now on (until the agent starts again)."""

    outgoing: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="MiB/s for every move to another host together; 0 = no host budget; null = unchanged",
    )
    outgoingMigrations: int | None = Field(
        default=None, ge=1, le=64, description="moves that run at once; more wait QUEUED; null = unchanged"
    )


class Tuning(_Wire):
    """``PATCH /v1/tasks/{id}``: retune a running task."""

    bandwidth: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="MiB/s for the whole task from now on; 0 = uncapped; null or absent = unchanged",
    )
    downTime: int | None = Field(default=None, ge=1, le=600_000, description="ms; null or absent = unchanged")
