"""The migration request body that ``migrate`` sends, built from its options.

The body is checked with the agent's own ``MigrationRequest`` model first, so a typo in a uuid is a usage
error naming the option (exit 2) instead of a round trip; what is sent is the dict built here, holding only
what the user gave, so the agent's defaults apply to the rest.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from agent.config import ConfigError, read_secret
from agent.migration.request import MigrationRequest

from .exits import UsageError

# Wire field -> the option that fills it, to name the option in errors.
_OPTION_OF = {
    "primaryStorageMigrateVm.dstPrimaryStorageUuid": "--dst-storage",
    "primaryStorageMigrateVm.dstHostUuid": "--dst-host-uuid",
    "primaryStorageMigrateVm.strategy": "--strategy",
    "migrateVm.downTime": "--downtime",
    "migrateVm.bandwidth": "--bandwidth",
    "dstHost.uuid": "--dst-host-uuid",
    "dstHost.agentUrl": "--dst-agent",
    "dstHost.migrationAddress": "--dst-migration-address",
    "dstHost.token": "--dst-token-file",
    "taskUuid": "--task-uuid",
    "timeout": "--timeout",
}


def migration_body(args: argparse.Namespace) -> dict[str, Any]:
    """``POST /v1/vms/{vmUuid}/storage-migrations`` body (DESIGN.md) from ``migrate``'s options."""
    psmv: dict[str, Any] = {
        "dstPrimaryStorageUuid": args.dst_storage,
        "withDataVolumes": args.with_data_volumes,
        "withSnapshots": args.with_snapshots,
        "strategy": args.strategy,
    }
    migrate_vm: dict[str, Any] = {}
    if args.downtime is not None:
        migrate_vm["downTime"] = args.downtime
    if args.bandwidth is not None:
        migrate_vm["bandwidth"] = args.bandwidth
    body: dict[str, Any] = {
        "primaryStorageMigrateVm": psmv,
        "migrateVm": migrate_vm,
        "systemTags": [],
        "userTags": [],
    }
    dst_host = _dst_host(args)
    if dst_host is not None:
        psmv["dstHostUuid"] = dst_host["uuid"]
        body["dstHost"] = dst_host
    if args.task_uuid is not None:
        body["taskUuid"] = args.task_uuid
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.allow_postcopy:
        body["allowPostCopy"] = True
    if args.priority is not None:
        body["priority"] = args.priority
    _check(body)
    return body


def _dst_host(args: argparse.Namespace) -> dict[str, Any] | None:
    others = {
        "--dst-agent": args.dst_agent,
        "--dst-migration-address": args.dst_migration_address,
        "--dst-token-file": args.dst_token_file,
    }
    if args.dst_host_uuid is None:
        given = [name for name, value in others.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} needs --dst-host-uuid")
        return None
    dst: dict[str, Any] = {"uuid": args.dst_host_uuid}
    if args.dst_agent is not None:
        dst["agentUrl"] = args.dst_agent
    if args.dst_migration_address is not None:
        dst["migrationAddress"] = args.dst_migration_address
    if args.dst_token_file is not None:
        try:
            dst["token"] = read_secret(args.dst_token_file, "--dst-token-file")
        except ConfigError as err:
            raise UsageError(str(err)) from err
    return dst


def _check(body: dict[str, Any]) -> None:
    try:
        MigrationRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        option = _OPTION_OF.get(where, where)
        raise UsageError(f"{option}: {first['msg']}") from err
