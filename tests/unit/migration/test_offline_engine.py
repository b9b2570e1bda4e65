"""The offline engine on one host, without libvirt: a fake host stands for the shut-off VM's definition and
the images are real (qemu-img on tmp_path), so the copies, the rebases, the rewritten definition and the
clean-up are the engine's own."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from service_fakes import STORAGE_B, VM_1, make_config

from agent.errors import MigrationFailed, PreflightFailed
from agent.migration.offline import LocalOfflineEngine
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState as S
from agent.storage.roots import StorageRoots
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost

pytestmark = pytest.mark.usefixtures("qemu_tools")

TASK = "cccccccc-0000-4000-8000-000000000001"
SERIAL = "4f9b2d6c8a0e4b1f9c3d5e7f1a2b3c4d"
MiB = 1 << 20


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def qemu_io_write(path: Path, pattern: int, offset_mib: int) -> None:
    command = f"write -P 0x{pattern:02x} {offset_mib}M 1M"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, check=True)


def chain_of(path: str) -> list[dict[str, Any]]:
    data = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", path))
    return data if isinstance(data, list) else [data]


def same_data(a: str, b: str) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", "-q", a, b], check=False).returncode == 0


def domain_xml(source: Path) -> str:
    return f"""<domain type='kvm'><name>vm1</name><uuid>{VM_1}</uuid><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{source}'/>
    <target dev='vda' bus='virtio'/><serial>{SERIAL}</serial><boot order='1'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/>
    <readonly/></disk>
</devices></domain>"""


class FakeHost:
    """The VM's libvirt definition, as the offline engine reads and rewrites it."""

    def __init__(self, xml: str, state: str = "shutoff", *, refuse_define: bool = False) -> None:
        self.xml = xml
        self.state = state
        self.refuse_define = refuse_define
        self.defined: list[str] = []

    async def domain_state(self, vm_uuid: str) -> str:
        return self.state

    async def inactive_xml(self, vm_uuid: str) -> str:
        return self.xml

    async def define_xml(self, xml: str) -> None:
        if self.refuse_define:
            raise MigrationFailed("libvirt refused the definition (test)")
        self.defined.append(xml)
        self.xml = xml


@dataclass
class FakeContext:
    """A task as the engine sees it: it records states, checkpoints, progress and notes."""

    request: MigrationRequest
    resume_data: Mapping[str, Any] | None = None
    detaching: bool = False
    task_uuid: str = TASK
    vm_uuid: str = VM_1
    bandwidth: int | None = None
    host_share: int | None = None
    downtime_ms: int = 300
    deadline: None = None
    cancel_requested: bool = False
    log: logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.LoggerAdapter(logging.getLogger("test.offline"), {})
    )
    states: list[S] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    progress_seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    async def enter(self, state: S, detail: str | None = None) -> None:
        self.states.append(state)

    async def checkpoint(self, data: Mapping[str, Any]) -> None:
        self.checkpoints.append(copy.deepcopy(dict(data)))

    def progress(self, item: str, done: int, total: int) -> None:
        self.progress_seen[item] = (done, total)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def attach_limits(self, limits: Any) -> None:
        self.limits = limits

    async def tuning_changed(self) -> None:
        await asyncio.Event().wait()


@dataclass
class Setup:
    src_root: Path
    dst_root: Path
    base: Path
    top: Path
    roots: StorageRoots
    engine: LocalOfflineEngine
    host: FakeHost


def setup(tmp_path: Path, *, state: str = "shutoff", refuse_define: bool = False) -> Setup:
    """A shut-off VM on rootA whose one disk is a two-layer chain (data in both), moving to rootB."""
    config = make_config(tmp_path)
    src_root, dst_root = tmp_path / "rootA", tmp_path / "rootB"
    base, top = src_root / "base.qcow2", src_root / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    qemu_io_write(base, 0x41, 1)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "16M")
    qemu_io_write(top, 0x42, 2)
    roots = StorageRoots.from_config(config)
    host = FakeHost(domain_xml(top), state, refuse_define=refuse_define)
    engine = LocalOfflineEngine(cast(VirtHost, host), roots, config)
    return Setup(src_root, dst_root, base, top, roots, engine, host)


def request(**psm: Any) -> MigrationRequest:
    return MigrationRequest.model_validate(
        {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_B, **psm}, "taskUuid": TASK}
    )


async def test_keeps_the_chain_rewrites_the_definition_and_reports_the_inventory(tmp_path: Path) -> None:
    s = setup(tmp_path)
    ctx = FakeContext(request(withSnapshots=True))

    inventory = await s.engine.run(ctx)

    assert ctx.states == [S.PREPARING, S.COPYING, S.SWITCHING, S.VERIFYING]
    new_top, new_base = s.dst_root / "top.qcow2", s.dst_root / "base.qcow2"
    assert [layer["filename"] for layer in chain_of(str(new_top))] == [str(new_top), str(new_base)]
    assert same_data(str(s.top), str(new_top)) and same_data(str(s.base), str(new_base))
    (vda,) = [d for d in parse_disks(s.host.xml) if d.device == "disk"]
    assert vda.source == str(new_top) and vda.format == "qcow2"
    assert len(s.host.defined) == 1
    # The source images are the management plane's to delete: never touched.
    assert [layer["filename"] for layer in chain_of(str(s.top))] == [str(s.top), str(s.base)]
    # Every created file was journalled before it was written, lower layers first.
    assert ctx.checkpoints[-1]["created"] == [str(new_base), str(new_top)]
    assert all(done == total for done, total in ctx.progress_seen.values()), ctx.progress_seen
    assert ctx.notes["plan"]["disks"][0]["to"] == str(new_top)
    (volume,) = inventory
    assert volume["uuid"] == SERIAL and volume["deviceName"] == "vda" and volume["moved"] is True
    assert volume["installPath"] == str(new_top) and volume["primaryStorageUuid"] == STORAGE_B
    assert [b["installPath"] for b in volume["backingChain"]] == [str(new_base)]
    assert volume["backingChain"][0]["primaryStorageUuid"] == STORAGE_B


async def test_without_snapshots_the_destination_gets_one_flat_image(tmp_path: Path) -> None:
    s = setup(tmp_path)
    ctx = FakeContext(request(withSnapshots=False))

    await s.engine.run(ctx)

    new_top = s.dst_root / "top.qcow2"
    assert len(chain_of(str(new_top))) == 1
    assert same_data(str(s.top), str(new_top))
    assert sorted(p.name for p in s.dst_root.iterdir()) == ["top.qcow2"]
    assert ctx.progress_seen == {"disk:vda": ctx.progress_seen["disk:vda"]}


async def test_a_running_vm_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    s = setup(tmp_path, state="running")
    ctx = FakeContext(request(withSnapshots=True))

    with pytest.raises(PreflightFailed) as refused:
        await s.engine.run(ctx)

    assert refused.value.field == "vmUuid" and "shut off" in refused.value.description
    assert ctx.states == [S.PREPARING]
    assert list(s.dst_root.iterdir()) == [] and s.host.defined == []


async def test_an_existing_target_is_refused_and_left_alone(tmp_path: Path) -> None:
    s = setup(tmp_path)
    (s.dst_root / "top.qcow2").write_bytes(b"someone else's")
    ctx = FakeContext(request(withSnapshots=True))

    with pytest.raises(PreflightFailed) as refused:
        await s.engine.run(ctx)

    assert refused.value.code == "AGENT.TARGET_EXISTS"
    assert (s.dst_root / "top.qcow2").read_bytes() == b"someone else's"
    assert sorted(p.name for p in s.dst_root.iterdir()) == ["top.qcow2"]
    assert S.COPYING not in ctx.states


async def test_a_failed_switch_removes_every_file_it_created(tmp_path: Path) -> None:
    s = setup(tmp_path, refuse_define=True)
    ctx = FakeContext(request(withSnapshots=True))

    with pytest.raises(MigrationFailed):
        await s.engine.run(ctx)

    assert ctx.states == [S.PREPARING, S.COPYING, S.SWITCHING]
    assert list(s.dst_root.iterdir()) == []
    assert s.host.xml == domain_xml(s.top), "the definition still names the source"
    assert s.top.exists() and s.base.exists()


async def test_a_detaching_agent_leaves_the_partial_copy_for_its_next_life(tmp_path: Path) -> None:
    s = setup(tmp_path, refuse_define=True)
    ctx = FakeContext(request(withSnapshots=True), detaching=True)

    with pytest.raises(MigrationFailed):
        await s.engine.run(ctx)

    assert sorted(p.name for p in s.dst_root.iterdir()) == ["base.qcow2", "top.qcow2"]


async def test_resumed_after_a_restart_it_removes_its_files_and_says_interrupted(tmp_path: Path) -> None:
    s = setup(tmp_path)
    partial = s.dst_root / "base.qcow2"
    partial.write_bytes(b"half a copy")
    outside = tmp_path / "not-in-a-root.qcow2"
    outside.write_bytes(b"not the agent's")
    ctx = FakeContext(
        request(withSnapshots=True),
        resume_data={"engine": "offline", "created": [str(outside), str(partial)]},
    )

    with pytest.raises(MigrationFailed) as failed:
        await s.engine.run(ctx)

    assert failed.value.code == "AGENT.INTERRUPTED"
    assert not partial.exists()
    assert outside.exists(), "only files inside a storage root are ever removed"
    assert ctx.states == [] and s.host.defined == []


async def test_the_engine_only_creates_files_inside_a_storage_root(tmp_path: Path) -> None:
    s = setup(tmp_path)
    ctx = FakeContext(request())
    data: dict[str, Any] = {"created": []}

    with pytest.raises(MigrationFailed, match="not inside a storage of this host"):
        await s.engine._record(ctx, data, str(tmp_path / "elsewhere.qcow2"))

    assert data["created"] == [] and ctx.checkpoints == []


async def test_a_retune_reaches_the_rate_the_copies_read_and_the_view_says_so(tmp_path: Path) -> None:
    """A stopped VM's files are moved by the agent: its limiter reads the budget of the move's LiveLimits for
    every chunk (issue 27), so a PATCH while it copies changes the rate at once."""
    s = setup(tmp_path)
    ctx = FakeContext(request(withSnapshots=True))
    seen: list[Any] = []
    real = s.engine._copy_file

    async def copy_file(c: Any, data: dict[str, Any], layer: Any) -> None:
        view = await ctx.limits.retune(cap=5 * 1024 * 1024)
        seen.append((s.engine._rate(ctx), view["effective"]["agentTransferBytesPerSecond"]))
        await real(c, data, layer)

    s.engine._copy_file = copy_file  # type: ignore[method-assign]
    await s.engine.run(ctx)
    assert seen and all(rate == (5 * 1024 * 1024, 5 * 1024 * 1024) for rate in seen)
    assert ctx.limits is None  # detached once the copies ended


async def test_one_layer_without_snapshots_is_copied_as_a_file_that_a_retune_reaches(tmp_path: Path) -> None:
    """A disk of one layer is flat already: copied as a file (its limiter reads the budget for every chunk),
    not through qemu-img convert, whose rate a retune cannot reach (issue 27)."""
    s = setup(tmp_path)
    single = s.src_root / "single.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(single), "16M")
    qemu_io_write(single, 0x43, 3)
    s.host.xml = domain_xml(single)
    ctx = FakeContext(request(withSnapshots=False))
    seen: list[Any] = []
    real = s.engine._copy_file

    async def copy_file(c: Any, data: dict[str, Any], layer: Any) -> None:
        view = await ctx.limits.retune(cap=3 * 1024 * 1024)
        seen.append((layer.src, s.engine._rate(ctx), view["effective"]["agentTransferBytesPerSecond"]))
        await real(c, data, layer)

    s.engine._copy_file = copy_file  # type: ignore[method-assign]
    await s.engine.run(ctx)
    assert seen == [(str(single), 3 * 1024 * 1024, 3 * 1024 * 1024)]
    assert same_data(str(single), str(s.dst_root / "single.qcow2"))
    assert len(chain_of(str(s.dst_root / "single.qcow2"))) == 1


async def test_a_retune_during_a_flattening_convert_is_not_pretended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu-img convert takes its rate once: while it flattens a chain the view shows that rate and why, and
    a retune asking for another one answers LimitsNotApplied (rule 5); later copies read the new one."""
    from agent.errors import LimitsNotApplied
    from agent.migration.offline import local as offline

    s = setup(tmp_path)
    ctx = FakeContext(request(withSnapshots=False), bandwidth=8 * 1024 * 1024)
    outcome: list[Any] = []
    real = offline.qemuimg.run

    async def run(*args: Any, **kwargs: Any) -> Any:
        if args[:2] == ("qemu-img", "convert"):
            try:
                await ctx.limits.retune(cap=2 * 1024 * 1024)
            except LimitsNotApplied as err:
                outcome.append(err.description)
            outcome.append(ctx.limits.view())
        return await real(*args, **kwargs)

    monkeypatch.setattr(offline.qemuimg, "run", run)
    await s.engine.run(ctx)
    message, view = outcome
    assert "agent transfer" in message and "keeps the rate it started with" in message
    assert view["effective"]["agentTransferBytesPerSecond"] == 8 * 1024 * 1024
    assert "qemu-img convert flattening vda" in view["effective"]["agentTransferPinned"]
    assert (
        view["unapplied"][-1]["knob"] == "agent transfer" and view["budgetBytesPerSecond"] == 2 * 1024 * 1024
    )
    assert s.engine.transfer.pinned is None  # unpinned once the convert ended
