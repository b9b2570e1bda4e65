"""A series, not a check (``-m series``; ``./scripts/test`` never runs it): the plain-TCP leg of
test_security.py (a young two-disk guest moved across hosts right after it booted, another guest running on
the destination) made again and again by the agent or by plain `virsh`, each run's harm written down.

    KSA_SERIES_MODE=virsh-plain-50 KSA_SERIES_RUNS=8 \
        .venv/bin/pytest -m series tests/lab/test_switchover_series.py

(tests/lab/conftest.py collects this file only when ``KSA_SERIES_MODE`` is set.)

Modes: ``agent-plain`` (the insecure twin agents, ``auto``, ``downTime`` 500, 40 MiB/s), ``agent-tls`` (the
lab's agents, the same request), ``virsh-plain-<ms>`` / ``virsh-tls-<ms>`` (`virsh migrate --live --p2p
--copy-storage-all --auto-converge --bandwidth 40`, the allowed downtime set to <ms> as the job starts).
Rows go to ``$KSA_SERIES_OUT/runs.jsonl`` (default /var/tmp/ksa-series), a harmed guest's console beside
them. docs/reliability.md, "Switchovers at 50 ms on QEMU 7.2 under TCG", has what it measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agentapi import disk_sources, migrate
from labtools import Guest, Lab, LabHost, kernel_death_after
from test_security import insecure_agents, tls_lab, to_host  # noqa: F401

from labkit.guestdir import console_path
from labkit.virsh import virsh_argv

MODE = os.environ.get("KSA_SERIES_MODE", "agent-plain")
RUNS = int(os.environ.get("KSA_SERIES_RUNS", "6"))
NEIGHBOUR = os.environ.get("KSA_SERIES_NEIGHBOUR", "1") == "1"
OUT = Path(os.environ.get("KSA_SERIES_OUT", "/var/tmp/ksa-series"))
pytestmark = [pytest.mark.lab, pytest.mark.series]


def virsh_move(src: LabHost, dst: LabHost, guest: Guest, tls: bool, downtime_ms: int) -> dict[str, Any]:
    sources = disk_sources(src, guest.name)
    new = {}
    for dev, path in sources.items():
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True, check=True
            ).stdout
        )
        target = str(dst.root("ps1").path / f"{guest.name}-{dev}.qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", target, str(info["virtual-size"])], check=True
        )
        new[dev] = target
    root = ET.fromstring(src.virsh("dumpxml", "--migratable", guest.name))
    for disk in root.iter("disk"):
        t, s = disk.find("target"), disk.find("source")
        name = None if t is None else t.get("dev")
        if s is not None and name in new:
            s.set("file", new[str(name)])
    calls: list[str] = []
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as xml:
        xml.write(ET.tostring(root, encoding="unicode"))
        xml.flush()
        argv = [
            *virsh_argv(src.libvirt_uri),
            "migrate",
            "--live",
            "--p2p",
            "--copy-storage-all",
            "--auto-converge",
            "--auto-converge-initial",
            "30",
            "--auto-converge-increment",
            "20",
            "--bandwidth",
            "40",
            "--persistent",
            "--undefinesource",
            "--abort-on-error",
            "--migrate-disks",
            ",".join(sorted(new)),
            "--xml",
            xml.name,
            "--persistent-xml",
            xml.name,
            "--migrateuri",
            f"tcp://{dst.migration_address}",
        ]
        if tls:
            argv.append("--tls")
        argv += [guest.name, dst.libvirt_uri]
        done = threading.Event()

        def steer() -> None:
            while not done.is_set():
                info = src.virsh("domjobinfo", guest.name, check=False)
                if "Unbounded" in info:
                    calls.append(
                        src.virsh("migrate-setmaxdowntime", guest.name, str(downtime_ms), check=False)
                    )
                    return
                time.sleep(0.05)

        th = threading.Thread(target=steer, daemon=True)
        th.start()
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        done.set()
        th.join(5)
    return {
        "rc": proc.returncode,
        "err": proc.stderr[-300:],
        "seconds": round(time.monotonic() - t0, 1),
        "setmax": len(calls),
    }


@pytest.mark.parametrize("run", range(RUNS))
async def test_switchover(
    tls_lab: Lab,  # noqa: F811
    make_guest: Callable[..., Guest],
    insecure_agents: dict[str, LabHost],  # noqa: F811
    run: int,
) -> None:
    src, dst = tls_lab.host("hostA"), tls_lab.host("hostB")
    if NEIGHBOUR:
        make_guest(host="hostB", data_volumes=1)
    guest = make_guest(data_volumes=1)
    guest.wait_for_acks(10)
    row: dict[str, Any] = {"mode": MODE, "run": run, "neighbour": NEIGHBOUR, "load": os.getloadavg()[0]}
    t0 = time.time()
    if MODE == "agent-plain":
        r = await migrate(tls_lab, insecure_agents["hostA"], guest.uuid, to_host(insecure_agents["hostB"]))
        row["state"] = r.state
        row["downtime"] = r.task.get("details", {}).get("downtimeMs")
    elif MODE == "agent-tls":
        r = await migrate(tls_lab, src, guest.uuid, to_host(dst))
        row["state"] = r.state
        row["downtime"] = r.task.get("details", {}).get("downtimeMs")
    else:  # virsh-plain-50, virsh-tls-50, virsh-plain-300
        tls = "tls" in MODE
        row.update(virsh_move(src, dst, guest, tls, int(MODE.rsplit("-", 1)[1])))
        row["state"] = "SUCCEEDED" if row["rc"] == 0 else "FAILED"
    row["moveSeconds"] = round(time.time() - t0, 1)
    row["where"] = guest.where()
    try:
        guest.wait_for_acks(5, timeout=90)
        row["harmed"] = False
    except AssertionError as err:
        row["harmed"] = True
        row["why"] = str(err)[:300]
        OUT.mkdir(exist_ok=True)
        shutil.copy(console_path(guest.name), OUT / f"{MODE}-{run}-{guest.name}.log")
    death = kernel_death_after(guest, 0)
    row["death"] = str(death)[:200] if death else None
    OUT.mkdir(exist_ok=True)
    with (OUT / "runs.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(row)
