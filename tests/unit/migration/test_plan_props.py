"""Property-based tests of the planner (issue 8): random domains, chains (shared bases included) and requests.

Whatever the input, a plan either is refused with a 400/409-class error naming a field, or holds every rule:
each disk planned or skipped exactly once (the root never skipped), every destination inside the destination
root and distinct from every source, chains kept layer for layer (base first, each layer backed by the copy
of the one below) or flattened, byte estimates that add up, and a journal round trip that loses nothing
(resume rebuilds the plan from it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.errors import AgentError, InvalidRequest, PathOutsideRoot, PreflightFailed
from agent.migration.plan import MigrationPlan, plan_migration, root_disk
from agent.migration.request import MigrationRequest
from agent.storage.qemuimg import ImageInfo
from agent.storage.roots import StorageRoot
from agent.virt.domxml import DiskXml

DST = "6f1c1d0e-59a4-4c43-9c0a-0a3c7f1f0b11"
GiB = 1024**3
TARGETS = ["vda", "vdb", "vdc", "vdd", "sda"]
NAMES = ["base", "mid", "snap1", "snap2", "top", "a", "b"]


@pytest.fixture(scope="module")
def root() -> Iterator[StorageRoot]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dst"
        path.mkdir()
        (path / "sub").mkdir()
        (path / "out").symlink_to("/tmp")  # a symlink leaving the root
        yield StorageRoot(DST, path)


@st.composite
def domains(draw: st.DrawFn) -> tuple[list[DiskXml], dict[str, list[ImageInfo]]]:
    """1-5 disks; file disks have chains of 1-4 layers whose lower layers may be shared with other disks."""
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=5, unique=True))
    bases: list[list[ImageInfo]] = []  # chains below layers already made, reusable as a shared base
    disks, chains = [], {}
    used: set[str] = set()
    boot = draw(st.sampled_from([None, *targets]))
    for target in targets:
        kind = draw(st.sampled_from(["file"] * 6 + ["block", "network"]))
        device = draw(st.sampled_from(["disk"] * 6 + ["cdrom"]))
        src_dir = f"/src/{draw(st.sampled_from(['p1', 'p2']))}"
        source = None
        if kind == "file" and device == "disk":
            depth = draw(st.integers(1, 4))
            below: ImageInfo | None = None
            chain: list[ImageInfo] = []
            if depth > 1 and bases and draw(st.booleans()):
                chain = list(draw(st.sampled_from(bases)))  # a base shared with an earlier disk, and below
                below = chain[0]
                depth -= 1
            for level in range(depth):
                path = f"{src_dir}/{target}-{level}.qcow2"
                if draw(st.booleans()):  # a name that may be taken in the other source directory
                    named = f"{src_dir}/{draw(st.sampled_from(NAMES))}.qcow2"
                    path = named if named not in used else path
                used.add(path)
                size = draw(st.integers(0, 10 * GiB))
                layer = ImageInfo(
                    path, "qcow2", GiB, size, below.path if below else None, "qcow2" if below else None, 65536
                )
                chain.insert(0, layer)
                if level < depth - 1:
                    bases.append(list(chain))
                below = layer
            source = chain[0].path
            chains[target] = chain
        elif kind == "block":
            source = f"/dev/vg/{target}"
        disks.append(
            DiskXml(
                target=target,
                device=device,
                type=kind,
                source=source,
                format="qcow2" if kind == "file" else "raw",
                readonly=draw(st.booleans()) and draw(st.booleans()),
                shareable=draw(st.booleans()) and draw(st.booleans()),
                serial=draw(st.sampled_from([None, f"ser-{target}"])),
                boot_order=1 if target == boot else None,
                backing=(),
                mirror=False,
                mirror_ready=False,
            )
        )
    return disks, chains


DST_PATHS = st.sampled_from(
    ["x.qcow2", "sub/y.qcow2", "../escape.qcow2", "/etc/passwd", "out/z.qcow2", "sub/../w.qcow2", "a/b.qcow2"]
)


@st.composite
def requests(draw: st.DrawFn, disks: list[DiskXml]) -> MigrationRequest:
    psm = {
        "dstPrimaryStorageUuid": DST,
        "withDataVolumes": draw(st.booleans()),
        "withSnapshots": draw(st.booleans()),
    }
    volumes = []
    for disk in disks:
        if disk.source and draw(st.booleans()) and draw(st.booleans()):
            entry = {"installPath": disk.source, "uuid": f"vol-{disk.target}"}
            if draw(st.booleans()):
                entry["dstInstallPath"] = draw(DST_PATHS)
            volumes.append(entry)
    return MigrationRequest.model_validate({"primaryStorageMigrateVm": psm, "volumes": volumes})


def inside(root: StorageRoot, path: str) -> bool:
    real = os.path.realpath(path)
    top = os.path.realpath(root.path)
    return os.path.commonpath([top, real]) == top and real != top


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_plan_keeps_every_rule(root: StorageRoot, data: st.DataObject) -> None:
    disks, chains = data.draw(domains())
    request = data.draw(requests(disks))
    assume(root_disk(disks) is not None)
    try:
        plan = plan_migration("vm", disks, chains, request, root)
    except (InvalidRequest, PreflightFailed) as err:
        # Refused before anything is written: a client error that names the offending field.
        assert err.field, err
        if isinstance(err, PathOutsideRoot):
            assert err.field.startswith("volumes[")
        return
    psm = request.primaryStorageMigrateVm
    root_target = root_disk(disks)
    assert root_target is not None
    planned = {d.target: d for d in plan.disks}
    skipped = {s.target for s in plan.skipped}
    # Every disk exactly once; the root always moves.
    assert set(planned) | skipped == {d.target for d in disks}
    assert not set(planned) & skipped
    assert root_target.target in planned and planned[root_target.target].role == "Root"
    sources = {layer.path for chain in chains.values() for layer in chain}
    destinations: dict[str, str] = {}
    placed_by: dict[str, str] = {}  # lower layer source -> the dir of the top of the first disk that has it
    for d in plan.disks:
        xml = next(x for x in disks if x.target == d.target)
        chain = chains[d.target]
        assert xml.type == "file" and xml.device == "disk" and not xml.readonly and not xml.shareable
        assert d.role == "Root" or psm.withDataVolumes
        assert d.src_top == chain[0].path and d.src_chain == tuple(layer.path for layer in chain)
        assert inside(root, d.dst_top), d.dst_top
        assert d.dst_top not in sources
        assert destinations.setdefault(d.dst_top, d.target) == d.target, "two disks onto one file"
        assert d.flatten == (not psm.withSnapshots or len(chain) == 1)
        if d.flatten:
            assert d.lower_layers == () and d.dst_backing is None
            assert d.estimated_bytes == sum(layer.actual_size for layer in chain)
        else:
            # Layer for layer, base first, each backed by the copy of the one below; the top on the last.
            assert [lp.src for lp in d.lower_layers] == [layer.path for layer in reversed(chain[1:])]
            below = None
            for lp in d.lower_layers:
                assert inside(root, lp.dst) and lp.dst not in sources
                assert os.path.basename(lp.dst) == os.path.basename(lp.src)
                # Next to the top, or, for a base shared between disks, next to the first one's top.
                owner = placed_by.setdefault(lp.src, os.path.dirname(d.dst_top))
                assert os.path.dirname(lp.dst) == owner
                assert lp.backing_dst == below
                below = lp.dst
            assert d.dst_backing == below
            assert d.estimated_bytes == chain[0].actual_size
    # Shared lower layers are copied once; all destination files distinct.
    layer_dsts = [lp.dst for lp in plan.layers]
    assert len(layer_dsts) == len(set(layer_dsts)) == len({lp.src for lp in plan.layers})
    assert not set(layer_dsts) & set(destinations)
    assert plan.bytes_total == sum(d.estimated_bytes for d in plan.disks) + sum(
        lp.actual_size for lp in plan.layers
    )
    # The journal round trip (resume reads the plan back from it) loses nothing.
    assert MigrationPlan.from_dict(plan.to_dict()) == plan


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(st.sampled_from("ab./_-~ \n\\x"), min_size=1, max_size=24) | DST_PATHS)
def test_a_destination_path_is_confined_or_refused(root: StorageRoot, path: str) -> None:
    """Any dstInstallPath string: the planned top lies inside the root, or the request is refused (400)."""
    assume("\x00" not in path)
    disks = [DiskXml("vda", "disk", "file", "/src/a.qcow2", "qcow2", False, False, None, 1, (), False, False)]
    chains = {"vda": [ImageInfo("/src/a.qcow2", "qcow2", GiB, 10, None, None, 65536)]}
    request = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST},
            "volumes": [{"installPath": "/src/a.qcow2", "dstInstallPath": path}],
        }
    )
    try:
        plan = plan_migration("vm", disks, chains, request, root)
    except AgentError as err:
        assert err.http_status == 400 and err.field and err.field.startswith("volumes"), err
        return
    assert inside(root, plan.disks[0].dst_top), (path, plan.disks[0].dst_top)
