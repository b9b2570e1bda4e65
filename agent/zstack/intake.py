"""Reading a ZStack migration command's body, and the refusal of one before it becomes a task."""

from __future__ import annotations

import json

from pydantic import ValidationError

from agent.api.validation import invalid_from
from agent.zstack.wire import MIGRATE, BlockLiveMigrationCmd, MigrateVmCmd


class Refused(Exception):
    """A command refused before it became a task; the message is ZStack's ``error`` string."""


def parse(kind: str, body: bytes) -> MigrateVmCmd | BlockLiveMigrationCmd:
    model: type[MigrateVmCmd] | type[BlockLiveMigrationCmd] = (
        MigrateVmCmd if kind == MIGRATE else BlockLiveMigrationCmd
    )
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise invalid_from(err) from err


def wants_reload(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("reload") is True
