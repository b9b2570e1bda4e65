"""A data volume left behind by a move to another host: refused when it is on local storage, allowed on a
filesystem other hosts mount too (libvirt's own rule, asked before the destination is prepared)."""

from __future__ import annotations

import pytest

from agent.errors import PreflightFailed
from agent.migration.crosshost.prepare import refuse_local_disks_left
from agent.migration.plan import DATA_VOLUME_LEFT, MigrationPlan, SkippedDisk
from agent.storage.sharedfs import filesystem_type, is_shared

MOUNTS = """\
/dev/sda1 / ext4 rw 0 0
server:/export /var/lib/zstack/nfs nfs4 rw,relatime 0 0
/dev/sdb1 /var/lib/zstack/nfs/local ext4 rw 0 0
/dev/sdc1 /mnt/with\\040space xfs rw 0 0
"""


def test_the_longest_mount_above_a_path_names_its_filesystem() -> None:
    assert filesystem_type("/var/lib/zstack/nfs/vol/a.qcow2", MOUNTS) == "nfs4"
    assert filesystem_type("/var/lib/zstack/nfs/local/a.qcow2", MOUNTS) == "ext4"
    assert filesystem_type("/var/lib/zstack/nfsother/a.qcow2", MOUNTS) == "ext4"  # a prefix is not a parent
    assert filesystem_type("/mnt/with space/a.qcow2", MOUNTS) == "xfs"
    assert is_shared("/var/lib/zstack/nfs/vol/a.qcow2", MOUNTS)
    assert not is_shared("/var/lib/zstack/nfs/local/a.qcow2", MOUNTS)


def _plan(*left: SkippedDisk) -> MigrationPlan:
    return MigrationPlan("vm", "dst", (), left)


def test_a_local_data_volume_left_behind_is_refused_naming_it() -> None:
    with pytest.raises(PreflightFailed) as err:
        refuse_local_disks_left(
            _plan(SkippedDisk("vdb", "/var/lib/zstack/nfs/local/b.qcow2", DATA_VOLUME_LEFT)), MOUNTS
        )
    assert err.value.field == "primaryStorageMigrateVm.withDataVolumes"
    assert "vdb" in err.value.description


def test_a_shared_data_volume_or_a_cdrom_may_stay() -> None:
    refuse_local_disks_left(
        _plan(
            SkippedDisk("vdb", "/var/lib/zstack/nfs/vol/b.qcow2", DATA_VOLUME_LEFT),
            SkippedDisk("hdc", "/var/lib/zstack/nfs/local/x.iso", "cdrom devices stay where they are"),
        ),
        MOUNTS,
    )
