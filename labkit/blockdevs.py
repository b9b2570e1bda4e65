"""The lab's block storage: on each host a directory of symlinks to loop devices, each backed by a sparse file
(device-mapper is absent here, so no LVM; a volume group's /dev/VG is such a directory of symlinks too).

Loop devices belong to the whole machine, not to a namespace: ``down`` detaches every one whose backing file
lies under this lab's directory (``losetup --list`` says which), whatever the state file remembers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .layout import BLOCK_DEVICE_MIB, BLOCK_DEVICES, LAB_DIR, HostSpec
from .sysutil import LabError, log, run


def attached() -> dict[Path, str]:
    """Backing file under LAB_DIR -> its loop device, for every loop device of this lab."""
    listing = json.loads(run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"]).stdout or "{}")
    found = {}
    for dev in listing.get("loopdevices", []):
        back = (dev.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(f"{LAB_DIR}/"):
            found[Path(back)] = str(dev["name"])
    return found


def device_names() -> tuple[str, ...]:
    return tuple(f"disk{i}" for i in range(BLOCK_DEVICES))


def ensure(host: HostSpec) -> None:
    """BLOCK_DEVICES loop devices of BLOCK_DEVICE_MIB each, linked as ``block_root/diskN``; idempotent."""
    host.loop_dir.mkdir(parents=True, exist_ok=True)
    host.block_root.mkdir(parents=True, exist_ok=True)
    have = attached()
    for name in device_names():
        backing = host.loop_dir / f"{name}.img"
        if not backing.exists():
            with backing.open("wb") as handle:
                handle.truncate(BLOCK_DEVICE_MIB << 20)
        device = have.get(backing)
        if device is None:
            # --find picks a free device; another lab may take the same one at the same moment: once more.
            proc = run(["losetup", "--find", "--show", backing], check=False)
            if proc.returncode != 0:
                proc = run(["losetup", "--find", "--show", backing])
            device = proc.stdout.strip()
            log(f"{host.name}: {name} is {device}")
        link = host.block_root / name
        if not link.is_symlink() or os.readlink(link) != device:
            link.unlink(missing_ok=True)
            link.symlink_to(device)


def remove_all() -> None:
    """Detach every loop device of this lab (their files go with LAB_DIR)."""
    for backing, device in attached().items():
        if run(["losetup", "--detach", device], check=False).returncode != 0:
            raise LabError(f"could not detach {device} (backed by {backing})")
