"""What libvirt is told when the migration starts: its flags and parameters, the disks' first speed, the
convergence policy, and whether the guest's writes call for write-blocking mirrors (hot disks, issue 16)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import libvirt

from agent.config import AgentConfig, StorageKind
from agent.errors import Code, MigrationFailed
from agent.migration import convergence
from agent.migration.convergence import floor
from agent.migration.engine import TaskContext, budget_of
from agent.migration.mirrors import hotdisk
from agent.migration.peer.wire import Prepared
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.request import Strategy
from agent.units import MiB
from agent.virt.domxml import VolumeSource, rewrite_disk_sources
from agent.virt.host import MigrateParams, VirtHost


def policy_of(ctx: TaskContext, *, switchover_floor_ms: int = 0) -> convergence.ConvergencePolicy:
    """The convergence policy of the request; it plans with the time left until the task's deadline.
    Pure: a resumed engine builds it for a migration whose domain may be gone from this host already (the
    floor only matters to a controller that starts, and ``_migrate_vm`` passes it)."""
    deadline = ctx.deadline
    return convergence.ConvergencePolicy.from_request(
        ctx.request,
        time_left_s=None if deadline is None else deadline.remaining(),
        switchover_floor_ms=switchover_floor_ms,
    )


async def switchover_floor(host: VirtHost, vm_uuid: str) -> int:
    """The least downtime a switchover of this domain must be allowed on this host's QEMU under the domain's
    accelerator (``convergence.floor``); asks libvirt, so only for a migration about to start."""
    qemu = (await host.versions())["qemu"]
    domain_type = await host.call_domain(vm_uuid, domain_type_of)
    return floor.switchover_floor_ms(qemu, domain_type)


def domain_type_of(dom: Any) -> str | None:
    """libvirt's domain type (``kvm``; ``qemu``: TCG, QEMU's own CPU emulation)."""
    return ET.fromstring(dom.XMLDesc(0)).get("type")


def first_mirror_speed(bandwidth: int, plan: MigrationPlan) -> int:
    """Bytes/s every disk mirror starts at: one share of the budget each, in whole MiB/s as libvirt takes
    it (at least 1)."""
    return max(1, bandwidth // max(1, len(plan.disks)) // MiB) * MiB


def migration_flags(
    config: AgentConfig,
    plan: MigrationPlan,
    policy: convergence.ConvergencePolicy,
    *,
    write_blocking: bool = False,
) -> int:
    flags: int = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
    )
    # libvirt 9.0 refuses a shallow storage migration onto a network disk (it would pre-create the target:
    # "pre-creation of storage targets for incremental storage migration is not supported"): onto RBD every
    # mirror is full, which stays thin onto a fresh image (measured: tests/lab/test_kinds_crosshost.py).
    if plan.shallow_mirrors and plan.dst_kind is not StorageKind.RBD:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC  # the top's data only: lower layers are there
    else:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK  # full: flattens a chain into the destination
    # Both capabilities must be set when the migration starts; QEMU cannot enable them later.
    if policy.wants_auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if policy.wants_postcopy_flag:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if write_blocking:  # every disk's mirror: libvirt has one copy mode for the whole migration
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
    if not config.insecure_transport:
        # Memory and the NBD disk mirrors over TLS with the hosts' certificates (qemu.conf
        # default_tls_x509_cert_dir; the destination verifies the source: migrate_tls_x509_verify).
        flags |= libvirt.VIR_MIGRATE_TLS
    return flags


async def migration_params(
    host: VirtHost, ctx: TaskContext, plan: MigrationPlan, prepared: Prepared
) -> MigrateParams:
    new_sources = {d.target: placed(prepared, d) for d in plan.disks}
    live = await host.call_domain(
        ctx.vm_uuid, lambda dom: str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    )
    inactive = await host.inactive_xml(ctx.vm_uuid)
    budget = budget_of(ctx)  # the task's own cap or its share of the host's budget, the smaller
    throttled = ctx.request.primaryStorageMigrateVm.strategy in (Strategy.AUTO_CONVERGE, Strategy.AUTO)
    policy = policy_of(ctx) if throttled else None
    return MigrateParams(
        migration_uri=prepared.migrationUri,
        disks=tuple(d.target for d in plan.disks),
        dest_xml=rewrite_disk_sources(live, new_sources),
        persist_xml=rewrite_disk_sources(inactive, new_sources),
        # libvirt starts every disk mirror at this speed on its own (LAB-NOTES): one share each keeps the
        # moment before the first steering tick within the budget. The memory stream gets the whole
        # budget when it starts (Steering.tick).
        bandwidth_mib=first_mirror_speed(budget, plan) // MiB if budget else None,
        auto_converge_initial=None if policy is None else policy.throttle_initial_pct,
        auto_converge_increment=None if policy is None else policy.throttle_increment_pct,
    )


def placed(prepared: Prepared, disk: DiskPlan) -> VolumeSource:
    """Where the destination agent put ``disk``, as the destination XML names it; it must be of the kind
    planned (a raw volume on RBD or a block device is planned flat; a file, with its chain)."""
    there = prepared.disk(disk.target)
    if there.kind is not disk.dst_kind:
        raise MigrationFailed(
            f"the destination agent placed {disk.target} on a {there.kind} volume, planned {disk.dst_kind}",
            code=Code.PEER_ERROR,
        )
    return there.source(disk.dst_format)


def choose_write_blocking(ctx: TaskContext, plan: MigrationPlan, rates: Mapping[str, float]) -> bool:
    """``auto`` (and the other memory strategies) migrate in write-blocking mode when a disk is hot for its
    share; ``precopy`` never does. The mode applies to every disk of the migration: each guest write on any
    of them then waits for the destination (a network round trip) before it completes."""
    budget = budget_of(ctx)
    if ctx.request.primaryStorageMigrateVm.strategy is Strategy.PRECOPY or not budget:
        return False
    share = first_mirror_speed(budget, plan)
    hot = {t: r for t, r in rates.items() if hotdisk.start_write_blocking(r, share)}
    if hot:
        ctx.log.info(
            "hot disk: migrating in write-blocking mode (all disks): guest writes %s B/s, share %d B/s",
            {t: int(r) for t, r in hot.items()},
            share,
        )
        ctx.note(
            "diskMode",
            {
                "mode": hotdisk.Mode.WRITE_BLOCKING.value,
                "message": "migrating in write-blocking mode: every guest write on every moving disk waits "
                "for the destination before it completes",
                "hot": {t: int(r) for t, r in hot.items()},
                "shareBytesPerSecond": share,
            },
        )
    return bool(hot)
