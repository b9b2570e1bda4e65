"""Property-based tests of chain handling against real qemu-img (issue 8).

Random chains (1-5 layers, raw or qcow2 base, backing names absolute or relative to the layer, layers
spread over sub-directories, odd file names) are built with qemu-img; ``qemuimg.backing_chain`` must read
them top first with every backing resolved to the real path of the layer below, and the planner fed with
what it read must plan a copy whose layers mirror the chain one for one, bases first.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.migration.plan import plan_migration
from agent.migration.request import MigrationRequest
from agent.storage import qemuimg
from agent.storage.roots import StorageRoot
from agent.virt.domxml import DiskXml

DST = "6f1c1d0e-59a4-4c43-9c0a-0a3c7f1f0b11"
MiB = 1024 * 1024
NAME_CHARS = st.sampled_from("abcxyz019-_.é ")


@st.composite
def chains(draw: st.DrawFn) -> list[tuple[str, str, bool]]:
    """Base first: (relative path, format, backing written relative) per layer."""
    depth = draw(st.integers(1, 5))
    layers = []
    used: set[str] = set()
    for level in range(depth):
        subdir = draw(st.sampled_from(["", "a/", "a/b/", "c/"]))
        stem = draw(st.text(NAME_CHARS, min_size=1, max_size=8)).strip(". ") or "x"
        rel = f"{subdir}{stem}-{level}.img"
        assert rel not in used
        used.add(rel)
        fmt = draw(st.sampled_from(["raw", "qcow2"])) if level == 0 else "qcow2"
        layers.append((rel, fmt, draw(st.booleans())))
    return layers


def build(tmp: Path, layers: list[tuple[str, str, bool]]) -> list[Path]:
    paths: list[Path] = []
    for rel, fmt, relative in layers:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        args = ["qemu-img", "create", "-q", "-f", fmt]
        if paths:
            below = paths[-1]
            backing = os.path.relpath(below, path.parent) if relative else str(below)
            args += ["-b", backing, "-F", layers[len(paths) - 1][1]]
        subprocess.run([*args, str(path), str(16 * MiB)], check=True, capture_output=True)
        paths.append(path)
    return paths


@settings(max_examples=25, deadline=None)
@given(layers=chains(), keep=st.booleans())
def test_chains_read_back_and_plan_one_for_one(layers: list[tuple[str, str, bool]], keep: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = build(tmp / "src", layers)
        (tmp / "dst").mkdir()

        chain = asyncio.run(qemuimg.backing_chain(str(paths[-1])))

        assert [os.path.realpath(layer.path) for layer in chain] == [str(p) for p in reversed(paths)]
        for upper, lower in itertools.pairwise(chain):
            assert upper.backing is not None
            assert os.path.realpath(upper.backing) == os.path.realpath(lower.path)
            assert upper.format == "qcow2" and upper.virtual_size == 16 * MiB
        assert chain[-1].backing is None and chain[-1].format == layers[0][1]

        disk = DiskXml(
            "vda", "disk", "file", str(paths[-1]), "qcow2", False, False, None, 1, (), False, False
        )
        request = MigrationRequest.model_validate(
            {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST, "withSnapshots": keep}}
        )
        plan = plan_migration("vm", [disk], {"vda": chain}, request, StorageRoot(DST, tmp / "dst"))
        (moved,) = plan.disks
        if not keep or len(chain) == 1:
            assert moved.flatten and moved.lower_layers == ()
        else:
            assert [lp.src for lp in moved.lower_layers] == [layer.path for layer in reversed(chain[1:])]
            assert [lp.format for lp in moved.lower_layers] == [layer.format for layer in reversed(chain[1:])]
            assert moved.dst_backing == moved.lower_layers[-1].dst
            assert moved.dst_backing_format == chain[1].format
