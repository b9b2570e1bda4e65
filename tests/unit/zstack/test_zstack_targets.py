"""Which of the destination's storages ZStack's `/vm/migrate` targets are in (from the destination agent's
offer): a directory holding the paths, or the RBD pool a `ceph://pool/image` names; one storage only."""

from __future__ import annotations

import pytest

from agent.errors import InvalidRequest
from agent.zstack.translate import _root_holding

OFFER = [
    {"uuid": "ps1", "kind": "file", "path": "/var/lib/zstack/ps1"},
    {"uuid": "blk", "kind": "block", "path": "/dev/zs-vg"},
    {"uuid": "ceph", "kind": "rbd", "pool": "zs", "namespace": None, "path": None},
    {"uuid": "ceph-t1", "kind": "rbd", "pool": "zs", "namespace": "t1", "path": None},
]


@pytest.mark.parametrize(
    ("paths", "storage"),
    [
        (["/var/lib/zstack/ps1/a.qcow2", "/var/lib/zstack/ps1/x/b.qcow2"], "ps1"),
        (["ceph://zs/vol-a", "ceph://zs/vol-b"], "ceph"),
        (["ceph://zs/t1/vol-a"], "ceph-t1"),
        (["rbd:zs/vol-a"], "ceph"),
    ],
)
def test_the_targets_name_their_storage(paths: list[str], storage: str) -> None:
    assert _root_holding(paths, OFFER) == storage


@pytest.mark.parametrize(
    "paths",
    [
        ["ceph://other/vol-a"],
        ["ceph://zs/vol-a", "/var/lib/zstack/ps1/b.qcow2"],
        ["/var/lib/zstack/ps1"],
        ["ceph://zs/a@s"],
    ],
    ids=["another pool", "two storages", "the root itself", "a snapshot"],
)
def test_targets_outside_one_storage_are_refused(paths: list[str]) -> None:
    with pytest.raises(InvalidRequest) as err:
        _root_holding(paths, OFFER)
    assert err.value.field == "disks"
