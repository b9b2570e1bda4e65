"""Snapshot metadata beside a cross-host migration (agent.migration.crosshost.snapmeta): it is redefined where
the VM runs, from the journal, so an agent restart or a settled failure never loses it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.errors import VirtError
from agent.migration import snapshots
from agent.migration.crosshost import snapmeta
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import Step
from agent.migration.peer.wire import Prepared
from agent.migration.plan import DiskPlan, MigrationPlan

VM = "0f6b2c1e-8d7a-4c39-9a57-3e2d1c0b9a88"
SNAP_XML = (
    "<domainsnapshot><name>{name}</name><disks><disk name='vda'><source file='{top}'/></disk></disks>"
    "<domain><devices><disk><source file='{base}'/></disk></devices></domain></domainsnapshot>"
)


class Dom:
    def __init__(self) -> None:
        self.defined: list[tuple[str, int]] = []

    def snapshotCreateXML(self, xml: str, flags: int) -> None:
        self.defined.append((xml, flags))


class Host:
    """A VirtHost's ``call_domain``: the function runs on a fake domain, or the VM is not there."""

    def __init__(self, has_vm: bool = True) -> None:
        self.dom = Dom()
        self.has_vm = has_vm
        self.closed = False

    async def call_domain(self, vm_uuid: str, fn: Callable[[Any], Any]) -> Any:
        assert vm_uuid == VM
        if not self.has_vm:
            raise VirtError("Domain not found")
        return fn(self.dom)

    async def close(self) -> None:
        self.closed = True


class Ctx:
    vm_uuid = VM

    def __init__(self) -> None:
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.notes: dict[str, Any] = {}

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value


def plan() -> MigrationPlan:
    base, top = "/src/base.qcow2", "/src/top.qcow2"
    disk = DiskPlan(
        target="vda",
        volume_uuid="vol",
        role="Root",
        src_top=top,
        src_format="qcow2",
        dst_top="/dst/top.qcow2",
        dst_format="qcow2",
        virtual_size=1 << 30,
        flatten=False,
        lower_layers=(),
        dst_backing=None,
        dst_backing_format=None,
        src_chain=(top, base),
        estimated_bytes=1 << 20,
    )
    return MigrationPlan(vm_uuid=VM, dst_storage_uuid="ps", disks=(disk,), skipped=())


METAS = [
    snapshots.SnapshotMeta(
        "s1", SNAP_XML.format(name="s1", top="/src/top.qcow2", base="/src/base.qcow2"), True
    )
]
PREPARED = Prepared.model_validate(
    {
        "migrationId": "11111111-2222-4333-8444-555555555599",
        "libvirtUri": "qemu+tls://hostB/system",
        "migrationUri": "tcp://hostB",
        "disks": [{"target": "vda", "top": "/dst/vm/top.qcow2"}],
    }
)


def test_the_journal_gives_the_work_back() -> None:
    """A cross-host move's checkpoint is JSON that gives back its plan, step, the destination's answer, the
    snapshot metadata (parents first) and the layers sent; an older checkpoint without them reads empty."""
    work = CrossHostWork(
        plan=plan(),
        step=Step.MIGRATING,
        prepared=PREPARED,
        snapshots=list(METAS),
        layers_done={"/d/b": "/s/b"},
    )
    data = json.loads(json.dumps(work.checkpoint_data()))
    assert data["engine"] == "cross-host" and data["step"] == "migrating"
    assert CrossHostWork.from_checkpoint(data) == work
    first = CrossHostWork.from_checkpoint({"step": "preparing", "plan": plan().to_dict()})
    assert (first.step, first.prepared, first.snapshots, first.layers_done) == (Step.PREPARING, None, [], {})
    with pytest.raises(RuntimeError, match="nothing prepared yet"):
        _ = first.destination
    newer = CrossHostWork.from_checkpoint({"step": "a-step-of-a-newer-agent", "plan": plan().to_dict()})
    assert newer.step is Step.PREPARING


async def test_put_back_here_redefines_each_snapshot_current_kept() -> None:
    host = Host()
    await snapmeta.put_back_here(host, Ctx(), METAS)  # type: ignore[arg-type]
    assert [xml for xml, _ in host.dom.defined] == [METAS[0].xml]
    assert host.dom.defined[0][1] & libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    assert host.dom.defined[0][1] & libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT


async def test_put_back_here_when_the_vm_left_does_nothing() -> None:
    host = Host(has_vm=False)
    await snapmeta.put_back_here(host, Ctx(), METAS)  # type: ignore[arg-type]
    assert host.dom.defined == []


async def test_carry_to_destination_rewrites_paths_there(monkeypatch: pytest.MonkeyPatch) -> None:
    remote = Host()
    opened: list[str] = []

    async def open_remote(uri: str) -> Host:
        opened.append(uri)
        return remote

    monkeypatch.setattr(snapmeta.VirtHost, "open", staticmethod(open_remote))
    ctx = Ctx()
    await snapmeta.carry_to_destination(ctx, plan(), PREPARED, METAS)  # type: ignore[arg-type]
    assert opened == ["qemu+tls://hostB/system"] and remote.closed
    ((xml, _flags),) = remote.dom.defined
    assert snapshots.snapshot_paths(xml) == ["/dst/vm/top.qcow2", str(Path("/dst/vm/base.qcow2"))]
    assert ctx.notes["snapshots"] == {"carried": ["s1"], "current": "s1"}


async def test_carry_to_destination_keeps_the_xml_in_the_details_when_it_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def open_remote(uri: str) -> Host:
        return Host(has_vm=False)

    monkeypatch.setattr(snapmeta.VirtHost, "open", staticmethod(open_remote))
    ctx = Ctx()
    await snapmeta.carry_to_destination(ctx, plan(), PREPARED, METAS)  # type: ignore[arg-type]
    assert "error" in ctx.notes["snapshots"]
    assert "/dst/vm/top.qcow2" in ctx.notes["snapshots"]["xml"][0]["xml"]
