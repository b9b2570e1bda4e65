"""Case 8: a running guest's disk (2 GiB, about a quarter of it data) onto Ceph RBD and from one pool to
another, on one host: the agent against ZStack's way (`virsh blockcopy --reuse-external` onto an image made
beforehand, `--wait --pivot --transient-job`) and `qemu-img convert` of the same data.

Measured from outside every method: the time (the agent's from the request to the final callback), and the
bytes the new image really uses (`rbd du`, whole 4 MiB objects) against the objects holding the source's
data. Capped (the agent only: `virsh blockcopy --bandwidth` is case 2's), the copy's real-bytes rate is the
image's used bytes over the agent's COPYING phase, against the cap.

Each repetition: file -> pool 1 -> pool 2 by the agent (uncapped), back to a file; the same two steps by
`virsh blockcopy`, back to a file; `qemu-img convert` file -> pool 1 -> pool 2 (the guest untouched); file ->
pool 1 capped by the agent, back to a file. Then across hosts: file -> pool 1 at the other host by the agent
(one migration; the other host's agent makes the image) and back onto a file there, and the same move by
`virsh migrate --live --p2p --copy-storage-all` onto an image made first (the destination XML naming it).
Every image a step left is removed once the guest is off it."""

from __future__ import annotations

import logging
import statistics
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any

from bench.agentrun import require_clean, run_task
from bench.context import Context
from bench.labenv import BenchGuest, MiB, _status, bench_guest, run
from bench.plot import plot_rbd
from bench.table import Row, Target
from labkit import ceph
from labkit.bodies import dst_host, migration_body
from labkit.virsh import virsh_argv

log = logging.getLogger(__name__)

AGENT = "agent (request to final callback)"
VIRSH = "virsh blockcopy --reuse-external --wait --pivot"
QEMU_IMG = "qemu-img convert"
VIRSH_MIGRATE = "virsh migrate --live --p2p --copy-storage-all"
DISK_MIB, FILL_MIB, CAP_MIB = 2048, 512, 50
PLOT_FILE = "rbd.png"


def _image(source: str) -> tuple[str, str]:
    """(pool, name) of an RBD disk source as the lab lists it (``pool/name``, or the image as the admin
    reads it: ``rbd:pool/name:id=admin:...``)."""
    spec = source.removeprefix("rbd:").split(":", 1)[0]
    pool, name = spec.split("/", 1)
    return pool, name


def _drop_images(guest: BenchGuest, made: set[str]) -> None:
    """Remove the images in ``made`` the guest no longer uses."""
    in_use = {"/".join(_image(p)) for p in guest.sources().values() if not p.startswith("/")}
    for spec in sorted(made - in_use):
        pool, name = _image(spec)
        if name in ceph.rbd_images(pool):
            ceph.rbd_remove(name, pool)
        made.discard(spec)


def _remove_left(made: set[str]) -> None:
    for spec in sorted(made):
        pool, name = _image(spec)
        if name in ceph.rbd_images(pool):
            ceph.rbd_remove(name, pool)


def _dest_xml(doc: dict[str, Any], pool: str, name: str) -> str:
    host, port = doc["monitors"][0].rsplit(":", 1)
    return (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        f"<source protocol='rbd' name='{pool}/{name}'><host name='{host}' port='{port}'/></source>"
        f"<auth username='{doc['user']}'><secret type='ceph' uuid='{doc['secretUuid']}'/></auth></disk>"
    )


def _virsh_onto(guest: BenchGuest, doc: dict[str, Any], pool: str, made: set[str]) -> float:
    """ZStack's way: an image of the disk's size made first, then blockcopy onto it, reusing it."""
    name = f"{guest.name}-virsh-{uuid.uuid4().hex[:6]}"
    ceph.rbd("create", "--size", f"{DISK_MIB}M", f"{pool}/{name}")
    made.add(f"{pool}/{name}")
    xml = f"/tmp/{name}.xml"
    with open(xml, "w") as out:
        out.write(_dest_xml(doc, pool, name))
    started = time.monotonic()
    guest.host.virsh(
        "blockcopy",
        guest.name,
        "vda",
        "--xml",
        xml,
        "--reuse-external",
        "--wait",
        "--pivot",
        "--transient-job",
    )
    took = time.monotonic() - started
    if _image(guest.sources()["vda"]) != (pool, name):
        raise RuntimeError(f"virsh blockcopy did not pivot {guest.name} onto {pool}/{name}")
    return took


def _virsh_migrate_onto(
    ctx: Context, guest: BenchGuest, doc: dict[str, Any], pool: str, made: set[str], tls: bool
) -> float:
    """Plain libvirt across hosts onto an image made first: the destination XML names it for vda."""
    src, dst = guest.host, ctx.lab.other(guest.host)
    name = f"{guest.name}-virsh-{uuid.uuid4().hex[:6]}"
    ceph.rbd("create", "--size", f"{DISK_MIB}M", f"{pool}/{name}")
    made.add(f"{pool}/{name}")
    root = ET.fromstring(src.virsh("dumpxml", "--migratable", guest.name))
    image = ET.fromstring(_dest_xml(doc, pool, name))
    for disk in root.iter("disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != "vda":
            continue
        disk.set("type", "network")
        for old in [c for c in disk if c.tag in ("driver", "source", "backingStore", "auth")]:
            disk.remove(old)
        for index, new in enumerate(c for c in image if c.tag in ("driver", "source", "auth")):
            disk.insert(index, new)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="bench-rbd-") as xml:
        xml.write(ET.tostring(root, encoding="unicode"))
        xml.flush()
        argv = [*virsh_argv(src.libvirt_uri), "migrate", "--live", "--p2p", "--copy-storage-all"]
        argv += ["--tls"] if tls else []
        argv += ["--migrate-disks", "vda", "--persistent", "--undefinesource", "--xml", xml.name]
        argv += ["--persistent-xml", xml.name, "--migrateuri", f"tcp://{dst.migration_address}"]
        argv += [guest.name, dst.libvirt_uri]
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        took = time.monotonic() - started
    guest.locate(ctx.lab)
    if proc.returncode != 0:
        raise RuntimeError(f"virsh migrate onto {pool}/{name} failed: {proc.stderr.strip()}")
    guest.moved_to(dst)
    if _image(guest.sources()["vda"]) != (pool, name):
        raise RuntimeError(f"virsh migrate did not put {guest.name} on {pool}/{name}")
    return took


async def _agent_across(ctx: Context, guest: BenchGuest, storage: str) -> float:
    """The agent's move to the other host onto ``storage`` (its pool, or a file root by uuid)."""
    dst = ctx.lab.other(guest.host)
    body = migration_body(storage, dstHostUuid=dst.uuid, dstHost=dst_host(dst), downTime=500)
    result = await run_task(ctx.lab, guest.host, guest.uuid, body, receiver=ctx.receiver, poll_s=0.5)
    guest.locate(ctx.lab)
    require_clean(result, "the agent's move across hosts")
    guest.moved_to(dst)
    guest.drop_unused_files()
    assert result.elapsed is not None
    return result.elapsed


def _convert(src: str, pool: str, made: set[str]) -> tuple[float, str]:
    name = f"convert-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    run(["qemu-img", "convert", "-U", "-O", "raw", src, ceph.qemu_uri(name, pool=pool)], timeout=600)
    made.add(f"{pool}/{name}")
    return time.monotonic() - started, name


async def _agent(
    ctx: Context, guest: BenchGuest, storage: str, cap: int | None = None
) -> tuple[float, float]:
    """One move by the agent: (request to final callback, COPYING phase) in seconds."""
    body = migration_body(storage, bandwidth=cap) if cap else migration_body(storage)
    result = await run_task(ctx.lab, guest.host, guest.uuid, body, receiver=ctx.receiver, poll_s=0.5)
    guest.drop_unused_files()  # the source file the agent leaves: the next move back takes its name
    require_clean(result, "the agent's move")
    assert result.elapsed is not None
    copying = result.phase("COPYING", ("SWITCHING",))
    return result.elapsed, copying or result.elapsed


async def _back_to_a_file(ctx: Context, guest: BenchGuest, made: set[str]) -> None:
    await _agent(ctx, guest, guest.host.root("ps1").uuid)
    _drop_images(guest, made)
    guest.drop_unused_files()


def _used(source: str) -> int:
    pool, name = _image(source)
    return ceph.rbd_used_bytes(name, pool)


async def run_case(ctx: Context) -> list[Row]:
    doc = _status()["ceph"]
    pool1, pool2 = doc["pool"], doc["pool2"]
    reps = 1 if ctx.settings.mode == "quick" else 3
    title = f"onto RBD, {DISK_MIB / 1024:.0f} GiB disk with {FILL_MIB} MiB of data, one host"
    times: dict[str, dict[str, list[float]]] = {
        m: {"file->rbd": [], "rbd->rbd": []} for m in (AGENT, VIRSH, QEMU_IMG)
    }
    across: dict[str, list[float]] = {AGENT: [], VIRSH_MIGRATE: []}  # file -> pool, to the other host
    across_used: dict[str, list[float]] = {AGENT: [], VIRSH_MIGRATE: []}
    tls = _status().get("transport") == "tls"
    used: dict[str, dict[str, list[float]]] = {
        m: {"file->rbd": [], "rbd->rbd": []} for m in (AGENT, VIRSH, QEMU_IMG)
    }
    capped: list[float] = []
    capped_time: list[float] = []
    data: list[int] = []
    made: set[str] = set()
    try:
        with bench_guest(ctx.lab, "rbd", disk_size_mib=DISK_MIB, fill_mib=FILL_MIB) as guest:
            try:
                for rep in range(reps):
                    src = guest.sources()["vda"]
                    objects = ceph.objects_with_data(src)
                    data.append(objects)
                    # The agent: file -> pool 1 -> pool 2.
                    took, _ = await _agent(ctx, guest, doc["storageUuid"])
                    made.add("/".join(_image(guest.sources()["vda"])))
                    times[AGENT]["file->rbd"].append(took)
                    used[AGENT]["file->rbd"].append(_used(guest.sources()["vda"]) / objects)
                    took, _ = await _agent(ctx, guest, doc["storage2Uuid"])
                    made.add("/".join(_image(guest.sources()["vda"])))
                    times[AGENT]["rbd->rbd"].append(took)
                    used[AGENT]["rbd->rbd"].append(_used(guest.sources()["vda"]) / objects)
                    await _back_to_a_file(ctx, guest, made)
                    # ZStack's way: virsh blockcopy onto images made first.
                    times[VIRSH]["file->rbd"].append(_virsh_onto(guest, doc, pool1, made))
                    used[VIRSH]["file->rbd"].append(_used(guest.sources()["vda"]) / objects)
                    _drop_images(guest, made)
                    guest.drop_unused_files()
                    times[VIRSH]["rbd->rbd"].append(_virsh_onto(guest, doc, pool2, made))
                    used[VIRSH]["rbd->rbd"].append(_used(guest.sources()["vda"]) / objects)
                    await _back_to_a_file(ctx, guest, made)
                    # qemu-img convert of the same data, the guest untouched.
                    src = guest.sources()["vda"]
                    took, first = _convert(src, pool1, made)
                    times[QEMU_IMG]["file->rbd"].append(took)
                    used[QEMU_IMG]["file->rbd"].append(ceph.rbd_used_bytes(first, pool1) / objects)
                    took, second = _convert(ceph.qemu_uri(first, pool=pool1), pool2, made)
                    times[QEMU_IMG]["rbd->rbd"].append(took)
                    used[QEMU_IMG]["rbd->rbd"].append(ceph.rbd_used_bytes(second, pool2) / objects)
                    _drop_images(guest, made)
                    # The agent capped: the image's used bytes over its COPYING phase, against the cap.
                    took, copying = await _agent(ctx, guest, doc["storageUuid"], cap=CAP_MIB)
                    made.add("/".join(_image(guest.sources()["vda"])))
                    capped.append(_used(guest.sources()["vda"]) / copying / (CAP_MIB * MiB))
                    capped_time.append(took)
                    await _back_to_a_file(ctx, guest, made)
                    # Across hosts: the agent, then plain libvirt onto an image made first; back each time.
                    home = guest.host
                    objects = ceph.objects_with_data(guest.sources()["vda"])
                    across[AGENT].append(await _agent_across(ctx, guest, doc["storageUuid"]))
                    made.add("/".join(_image(guest.sources()["vda"])))
                    across_used[AGENT].append(_used(guest.sources()["vda"]) / objects)
                    await _agent_across(ctx, guest, home.root("ps1").uuid)
                    _drop_images(guest, made)
                    across[VIRSH_MIGRATE].append(_virsh_migrate_onto(ctx, guest, doc, pool1, made, tls))
                    across_used[VIRSH_MIGRATE].append(_used(guest.sources()["vda"]) / objects)
                    await _agent_across(ctx, guest, home.root("ps1").uuid)
                    _drop_images(guest, made)
                    log.info(
                        "case 8 rep %d: %s",
                        rep + 1,
                        {m: {k: v[-1] for k, v in t.items()} for m, t in times.items()},
                    )
            finally:
                _drop_images(guest, made)
    finally:
        _remove_left(made)  # an image the guest was on when it was destroyed
    ctx.raw["8"] = {
        "times": times,
        "usedOverData": used,
        "cappedRateOverCap": capped,
        "dataBytes": data,
        "acrossHosts": {"times": across, "usedOverData": across_used},
    }
    ctx.figures[PLOT_FILE] = lambda path: plot_rbd(times, used, path)
    note = f"the source's data fills {statistics.median(data) / MiB:.0f} MiB of 4 MiB objects"
    rows: list[Row] = []
    for step in ("file->rbd", "rbd->rbd"):
        rows += [
            Row(
                "8",
                f"{title}: {step}",
                AGENT,
                "time",
                "s",
                times[AGENT][step],
                baseline=VIRSH,
                baseline_values=times[VIRSH][step],
                target=Target(high=1.10),
                note=note,
            ),
            Row(
                "8",
                f"{title}: {step}",
                VIRSH,
                "time",
                "s",
                times[VIRSH][step],
                baseline=QEMU_IMG,
                baseline_values=times[QEMU_IMG][step],
            ),
            Row("8", f"{title}: {step}", QEMU_IMG, "time", "s", times[QEMU_IMG][step]),
        ]
        for method in (AGENT, VIRSH, QEMU_IMG):
            rows.append(
                Row(
                    "8",
                    f"{title}: {step}",
                    method,
                    "RBD used / source data",
                    "x",
                    used[method][step],
                    target=Target(high=1.05, on="value") if method == AGENT else None,
                )
            )
    title_across = f"onto RBD, {DISK_MIB / 1024:.0f} GiB disk with {FILL_MIB} MiB of data, to the other host"
    rows += [
        Row(
            "8",
            f"{title_across}: file->rbd",
            AGENT,
            "time",
            "s",
            across[AGENT],
            baseline=VIRSH_MIGRATE,
            baseline_values=across[VIRSH_MIGRATE],
            target=Target(high=1.10),
            note=note,
        ),
        Row("8", f"{title_across}: file->rbd", VIRSH_MIGRATE, "time", "s", across[VIRSH_MIGRATE]),
    ]
    for method in (AGENT, VIRSH_MIGRATE):
        rows.append(
            Row(
                "8",
                f"{title_across}: file->rbd",
                method,
                "RBD used / source data",
                "x",
                across_used[method],
                target=Target(high=1.05, on="value") if method == AGENT else None,
            )
        )
    rows.append(
        Row(
            "8",
            f"{title}: file->rbd at {CAP_MIB} MiB/s",
            AGENT,
            "real-bytes rate / cap",
            "x",
            capped,
            target=Target(high=1.10, on="value"),
            note=f"request to final callback {statistics.median(capped_time):.1f} s",
        )
    )
    return rows  # fmt: skip
