"""Which QEMU node a running disk's map is exported from (``query-block``, libvirt's -blockdev names)."""

from __future__ import annotations

import pytest

from agent.errors import MigrationFailed
from agent.virt.livemap import _node_of

BLOCKS = [
    {
        "device": "",
        "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
        "inserted": {"node-name": "libvirt-2-format"},
    },
    {
        "device": "",
        "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
        "inserted": {"node-name": "libvirt-1-format"},
    },
    {"device": "", "qdev": "scsi0-0-0-0", "inserted": {"node-name": "libvirt-3-format"}},
    {"device": "", "qdev": "ide0-0-0"},  # an empty drive
]


def test_the_node_is_found_by_libvirts_alias() -> None:
    assert _node_of(BLOCKS, "vda", "virtio-disk0") == "libvirt-2-format"
    assert _node_of(BLOCKS, "vdb", "virtio-disk1") == "libvirt-1-format"
    assert _node_of(BLOCKS, "sda", "scsi0-0-0-0") == "libvirt-3-format"


def test_no_node_for_an_empty_drive_or_an_unknown_disk() -> None:
    for target, alias in (("hda", "ide0-0-0"), ("vdz", "virtio-disk9"), ("vda", None)):
        with pytest.raises(MigrationFailed):
            _node_of(BLOCKS, target, alias)
