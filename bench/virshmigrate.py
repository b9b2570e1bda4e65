"""Plain libvirt's live migration with storage (``virsh migrate --live --copy-storage-all``): the baseline
cases 2 (one bandwidth cap) and 6 (TLS) measure the agent against."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from contextlib import AbstractContextManager
from typing import Any

from bench.labenv import BenchError, BenchGuest, Host, Lab, run, virtual_size
from labkit.virsh import virsh_argv


def destination_xml(src: Host, name: str, new_paths: dict[str, str]) -> str:
    """The domain's migratable XML with the named disks (target -> path) on their new files."""
    root = ET.fromstring(src.virsh("dumpxml", "--migratable", name))
    for disk in root.iter("disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and target.get("dev") in new_paths:
            source.set("file", new_paths[str(target.get("dev"))])
            for stale in disk.findall("backingStore"):
                disk.remove(stale)
    return ET.tostring(root, encoding="unicode")


def create_targets(guest: BenchGuest, dst: Host) -> dict[str, str]:
    """Empty qcow2 targets for every disk of ``guest`` in ``dst``'s ``ps1`` (libvirt needs the targets of
    plain files to exist), each as large as its source; the guest owns them from here (``guest.files``)."""
    sources = guest.sources()
    new_paths = {
        dev: str(dst.root("ps1").path / f"{guest.name}-{dev}-{uuid.uuid4().hex[:6]}.qcow2") for dev in sources
    }
    for dev, path in new_paths.items():
        guest.files.add(path)
        run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(virtual_size(sources[dev]))])
    return new_paths


def virsh_migrate(
    lab: Lab,
    guest: BenchGuest,
    options: list[str],
    *,
    during: AbstractContextManager[Any] | None = None,
) -> tuple[float, float]:
    """Move the guest live, with every disk flattened into the other host's ``ps1``, by ``virsh migrate
    --live --copy-storage-all --persistent --undefinesource`` plus ``options``; ``during`` is entered for the
    migration only (a watcher). Returns (started, seconds taken); a failed migration raises ``BenchError``
    once the guest was located again and its unused files dropped."""
    src, dst = guest.host, lab.other(guest.host)
    new_paths = create_targets(guest, dst)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="bench-") as xml:
        xml.write(destination_xml(src, guest.name, new_paths))
        xml.flush()
        argv = [*virsh_argv(src.libvirt_uri), "migrate", "--live", "--copy-storage-all", *options]
        argv += ["--persistent", "--undefinesource", "--xml", xml.name, "--persistent-xml", xml.name]
        argv += ["--migrateuri", f"tcp://{dst.migration_address}", guest.name, dst.libvirt_uri]
        started = time.monotonic()
        with during or contextlib.nullcontext():
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        took = time.monotonic() - started
    if proc.returncode != 0:
        guest.locate(lab)
        guest.drop_unused_files()
        raise BenchError(f"virsh migrate {' '.join(options)} failed: {proc.stderr.strip()}")
    guest.moved_to(dst)
    guest.drop_unused_files()
    return started, took
