"""The lab's Ceph: one monitor and one BlueStore OSD with cephx, Debian's Pacific, in the root namespace on
the bridge's address (both hosts' namespaces reach it there; 127.0.0.1 would serve only the root namespace).

The daemons run in the foreground under a holder of their own (``labkit.holder`` without namespaces: it reaps
them, PID 1 here does not) and are stopped by pid. Everything lives under ``CEPH_DIR``: the configuration,
keyrings, the monitor's store, the OSD's data dir and, outside that dir, its sparse block file (BlueStore's
``block`` symlink in the data dir would point at itself otherwise). No ``admin_socket`` is set: daemons
keep Ceph's per-name default, and clients (QEMU, ``rbd``) open none, so concurrent clients do not collide.
The pools ``CEPH_POOL`` and ``CEPH_POOL2`` hold one replica each; ``client.CEPH_USER`` may use them
(`profile rbd`) and nothing else;
its key is the value of one libvirt secret (usage ``ceph``) defined on every host under the same uuid.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from . import holder
from .layout import (
    CEPH_ADDRESS,
    CEPH_DIR,
    CEPH_MON_PORTS,
    CEPH_OSD_BYTES,
    CEPH_POOL,
    CEPH_POOL2,
    CEPH_USER,
    REPO_ROOT,
    HostSpec,
)
from .state import CephState
from .sysutil import LabError, kill_pids, log, pid_cmdline, pid_matches, run, tail_file, wait_for, write_file
from .virsh import virsh

CLUSTER = CEPH_DIR / "cluster"  # made anew by a bootstrap; the holder's socket and log stay beside it
CONF = CLUSTER / "ceph.conf"
ADMIN_KEYRING = CLUSTER / "admin.keyring"
CLIENT_KEY = CLUSTER / f"client.{CEPH_USER}.key"  # the client's key as Ceph prints it (base64)
OSD_BLOCK = CLUSTER / "osd.0.block"
BOOTSTRAPPED = CLUSTER / "bootstrapped"
HOLDER_SOCKET = CEPH_DIR / "holder.sock"
HOLDER_NAME = "ceph"
MON_ADDRS = f"[v2:{CEPH_ADDRESS}:{CEPH_MON_PORTS[0]},v1:{CEPH_ADDRESS}:{CEPH_MON_PORTS[1]}]"
DAEMONS = ("ceph-mon", "ceph-osd")


def conf_text(fsid: str) -> str:
    return f"""# written by scripts/lab: a one-node cluster for the lab's two hosts
[global]
fsid = {fsid}
mon_host = {MON_ADDRS}
public_addr = {CEPH_ADDRESS}
cluster_addr = {CEPH_ADDRESS}
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = {ADMIN_KEYRING}
run_dir = {CLUSTER}/run
log_file = {CLUSTER}/log/$name.log
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 5
osd_crush_chooseleaf_type = 0
[mon]
mon_data = {CLUSTER}/mon
[osd]
osd_data = {CLUSTER}/osd
keyring = {CLUSTER}/osd/keyring
osd_objectstore = bluestore
bluestore_block_path = {OSD_BLOCK}
bluestore_block_create = true
bluestore_block_size = {CEPH_OSD_BYTES}
# the smallest target Pacific takes (default 4 GiB): the machine is shared
osd_memory_target = 939524096
"""


def ceph(*args: str, input: str | None = None, timeout: float = 60) -> str:
    """The ``ceph`` command as the cluster's admin."""
    argv = ["ceph", "-c", str(CONF), "--connect-timeout", str(int(timeout)), *args]
    return run(argv, input=input, timeout=timeout + 10).stdout


def rbd(*args: str, timeout: float = 120) -> str:
    """The ``rbd`` command as the cluster's admin, from the root namespace (the monitor is on the bridge)."""
    return run(["rbd", "-c", str(CONF), *args], timeout=timeout).stdout


# --- images in the pool (what tests of moves onto RBD check from outside) -----------------------------------


def _spec(image: str, pool: str = CEPH_POOL) -> str:
    """``pool/image`` of an image of ``pool``, given by its name in the pool ([namespace/]name)."""
    return f"{pool}/{image}"


def qemu_uri(image: str, *, pool: str = CEPH_POOL) -> str:
    """The image as ``qemu-img`` and ``qemu-io`` name it, read from the root namespace as the admin:
    ``rbd:pool/image:id=admin:conf=CONF:keyring=ADMIN_KEYRING`` (no ':' in the lab's paths to escape)."""
    return f"rbd:{pool}/{image}:id=admin:conf={CONF}:keyring={ADMIN_KEYRING}"


def rbd_images(pool: str = CEPH_POOL) -> list[str]:
    """The names of the images in the pool (its default namespace), sorted."""
    return sorted(json.loads(rbd("ls", "--format", "json", pool) or "[]"))


def rbd_used_bytes(image: str, pool: str = CEPH_POOL) -> int:
    """Bytes the image really uses (``rbd du``'s ``used_size``): counted in whole RADOS objects, 4 MiB by
    default, so a few bytes written make one object's worth; 0 for an image never written."""
    doc = json.loads(rbd("du", "--format", "json", _spec(image, pool)))
    return sum(int(entry["used_size"]) for entry in doc.get("images", []) if "snapshot" not in entry)


#: RBD stores an image in objects of this size (the pools' default): a thin image uses whole objects.
RBD_OBJECT = 4 << 20


def objects_with_data(path: str) -> int:
    """Bytes of the 4 MiB objects an image of ``path``'s data would use: every object holding data of its
    flattened chain (``qemu-img map``)."""
    out = run(["qemu-img", "map", "-U", "--output=json", path]).stdout
    objects: set[int] = set()
    for extent in json.loads(out):
        if extent["data"]:
            end = extent["start"] + extent["length"] - 1
            objects.update(range(extent["start"] // RBD_OBJECT, end // RBD_OBJECT + 1))
    return len(objects) * RBD_OBJECT


def rbd_remove(image: str, pool: str = CEPH_POOL) -> None:
    """Remove the image and its snapshots from the pool; LabError if it is missing or still open (a
    watcher: QEMU)."""
    rbd("snap", "purge", "--no-progress", _spec(image, pool))
    rbd("rm", "--no-progress", _spec(image, pool))


# --- processes ---------------------------------------------------------------------------------------------


def _ours(pid: int, name: str) -> bool:
    """A live ``name`` process (ceph-mon, ceph-osd, or the holder) of this lab's cluster."""
    argv = pid_cmdline(pid)
    return pid_matches(pid, name) and any(part.startswith(f"{CEPH_DIR}/") for part in argv)


def holder_ok(cs: CephState) -> bool:
    return (
        cs.holder_pid is not None
        and _ours(cs.holder_pid, "labkit.holder")
        and holder.ping(HOLDER_SOCKET) == cs.holder_pid
    )


def mon_ok(cs: CephState) -> bool:
    return cs.mon_pid is not None and _ours(cs.mon_pid, "ceph-mon")


def osd_ok(cs: CephState) -> bool:
    return cs.osd_pid is not None and _ours(cs.osd_pid, "ceph-osd")


def lab_pids() -> tuple[list[int], list[int]]:
    """(daemons, holders) of this lab's cluster, found by their command lines (which name CEPH_DIR): also
    after a crash that lost the state file."""
    daemons, holders = [], []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if any(_ours(pid, name) for name in DAEMONS):
            daemons.append(pid)
        elif _ours(pid, "labkit.holder"):
            holders.append(pid)
    return daemons, holders


def stop(cs: CephState | None) -> list[int]:
    """Stop the daemons (SIGKILL: the cluster goes with the lab, and a clean OSD shutdown takes seconds),
    then their holder, by pid; return the pids signalled."""
    daemons, holders = lab_pids()
    if cs is not None:
        cs.mon_pid = cs.osd_pid = cs.holder_pid = None
    if daemons:
        kill_pids(daemons, sig=signal.SIGKILL)
    if holders:
        kill_pids(holders)
    return daemons + holders


def _start_holder(cs: CephState) -> None:
    CEPH_DIR.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "labkit.holder", HOLDER_NAME, str(HOLDER_SOCKET)]
    with (CEPH_DIR / "holder.log").open("ab") as out:
        # Not waited for: it outlives this command by design; `down` stops it by pid.
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    cs.holder_pid = proc.pid
    wait_for("the Ceph holder", lambda: holder.ping(HOLDER_SOCKET) == proc.pid, timeout=15)


def _spawn(daemon: str, ident: str) -> int:
    argv = [daemon, "-c", str(CONF), "-i", ident, "-f"]
    out = CEPH_DIR / f"{daemon}.out"
    reply = holder.request(HOLDER_SOCKET, {"op": "spawn", "argv": argv, "log": str(out), "env": {}})
    if not reply.get("ok"):
        raise LabError(f"the Ceph holder could not start {daemon}: {reply.get('error')}")
    pid = int(reply["pid"])
    log(f"ceph: {daemon} pid {pid}")
    return pid


def _mon_listens() -> bool:
    try:
        with socket.create_connection((CEPH_ADDRESS, CEPH_MON_PORTS[0]), timeout=1):
            return True
    except OSError:
        return False


# --- bring-up ----------------------------------------------------------------------------------------------


def _authtool(*args: str) -> str:
    return run(["ceph-authtool", *args]).stdout


def _bootstrap(cs: CephState) -> None:
    """A new cluster: monitor store, OSD, pool and client. Monitor commands go while the OSD starts."""
    shutil.rmtree(CLUSTER, ignore_errors=True)
    for sub in ("mon", "osd", "run", "log"):
        (CLUSTER / sub).mkdir(parents=True)
    cs.fsid = str(uuid.uuid4())
    write_file(CONF, conf_text(cs.fsid))
    mon_keyring = CLUSTER / "mon.keyring"
    _authtool("--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
    caps = ["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"]
    _authtool("--create-keyring", str(ADMIN_KEYRING), "--gen-key", "-n", "client.admin", *caps)
    _authtool(str(mon_keyring), "--import-keyring", str(ADMIN_KEYRING))
    monmap = CLUSTER / "monmap"
    run(["monmaptool", "--create", "--fsid", cs.fsid, "--addv", "a", MON_ADDRS, str(monmap)])
    run(
        [
            "ceph-mon",
            "-c",
            str(CONF),
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            str(monmap),
            "--keyring",
            str(mon_keyring),
        ]
    )
    cs.mon_pid = _spawn("ceph-mon", "a")
    wait_for(f"ceph-mon on {CEPH_ADDRESS}:{CEPH_MON_PORTS[0]}", _mon_listens, timeout=60, interval=0.2)

    osd_keyring = CLUSTER / "osd" / "keyring"
    _authtool("--create-keyring", str(osd_keyring), "--gen-key", "-n", "osd.0")
    secret = _authtool("-p", "-n", "osd.0", str(osd_keyring)).strip()
    osd_uuid = str(uuid.uuid4())
    osd_id = ceph("osd", "new", osd_uuid, "-i", "-", input=json.dumps({"cephx_secret": secret})).strip()
    if osd_id != "0":
        raise LabError(f"ceph osd new gave id {osd_id!r}, not 0")
    run(["ceph-osd", "-c", str(CONF), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], timeout=180)
    cs.osd_pid = _spawn("ceph-osd", "0")

    for pool in (CEPH_POOL, CEPH_POOL2):
        ceph("osd", "pool", "create", pool, "8", "8")
        ceph("osd", "pool", "application", "enable", pool, "rbd")
    caps = ["mon", "profile rbd", "osd", f"profile rbd pool={CEPH_POOL}, profile rbd pool={CEPH_POOL2}"]
    key = ceph("auth", "get-or-create-key", f"client.{CEPH_USER}", *caps).strip()
    write_file(CLIENT_KEY, key + "\n", 0o600)
    BOOTSTRAPPED.touch()


def _wait_ready(cs: CephState) -> None:
    """The OSD is up and the pool answers (``rbd ls`` reads an object: its placement group is active)."""

    def osd_up() -> bool:
        for daemon, ok in (("ceph-mon", mon_ok), ("ceph-osd", osd_ok)):
            if not ok(cs):
                out = CEPH_DIR / f"{daemon}.out"
                raise LabError(f"ceph: {daemon} exited; {out}:\n{tail_file(out)}")
        stat = json.loads(ceph("osd", "stat", "-f", "json", timeout=20))
        return int(stat.get("num_up_osds", 0)) == 1

    wait_for("the Ceph OSD to be up", osd_up, timeout=120, interval=0.5)
    for pool in (CEPH_POOL, CEPH_POOL2):
        run(["rbd", "-c", str(CONF), "ls", pool], timeout=120)


def ensure(cs: CephState) -> None:
    """Bring the cluster up (a new one, or its daemons restarted on the existing store); idempotent."""
    if not holder_ok(cs):
        stop(cs)
        _start_holder(cs)
    if not BOOTSTRAPPED.exists():
        log("ceph: a new one-node cluster (1 monitor, 1 BlueStore OSD, cephx)")
        daemons = lab_pids()[0]
        if daemons:
            kill_pids(daemons, grace=10)
        _bootstrap(cs)
    else:
        if not mon_ok(cs):
            cs.mon_pid = _spawn("ceph-mon", "a")
        if not osd_ok(cs):
            cs.osd_pid = _spawn("ceph-osd", "0")
    _wait_ready(cs)


# --- the hosts' libvirt secret ------------------------------------------------------------------------------


def client_key() -> str:
    return CLIENT_KEY.read_text().strip()


def secret_xml(cs: CephState) -> str:
    return (
        f"<secret ephemeral='no' private='yes'><uuid>{cs.secret_uuid}</uuid>"
        f"<usage type='ceph'><name>client.{CEPH_USER} secret</name></usage></secret>\n"
    )


def ensure_secret(host: HostSpec, cs: CephState) -> None:
    """The secret on the host's libvirtd (persistent: libvirt keeps it in the host's own /etc/libvirt,
    where this reads whether it holds today's key; libvirt 9.0 stores the value there as base64)."""
    stored = host.private_dir("/etc/libvirt") / "secrets" / f"{cs.secret_uuid}.base64"
    key = client_key()
    try:
        if stored.read_text().strip() == key:
            return
    except OSError:
        pass
    xml = CEPH_DIR / f"secret-{host.name}.xml"
    write_file(xml, secret_xml(cs))
    virsh(host, "secret-define", str(xml))
    virsh(host, "secret-set-value", "--secret", cs.secret_uuid, "--file", str(CLIENT_KEY))
    log(f"{host.name}: libvirt secret {cs.secret_uuid} (ceph client.{CEPH_USER})")


# --- what the status says -----------------------------------------------------------------------------------


def status(cs: CephState) -> dict[str, Any]:
    return {
        "monitors": [f"{CEPH_ADDRESS}:{CEPH_MON_PORTS[1]}"],
        "pool": CEPH_POOL,
        "pool2": CEPH_POOL2,
        "storage2Uuid": cs.storage2_uuid,
        "user": CEPH_USER,
        "secretUuid": cs.secret_uuid,
        "storageUuid": cs.storage_uuid,
        "conf": str(CONF),
        "adminKeyring": str(ADMIN_KEYRING),
        "pids": {"holder": cs.holder_pid, "mon": cs.mon_pid, "osd": cs.osd_pid},
        "health": {"holder": holder_ok(cs), "mon": mon_ok(cs), "osd": osd_ok(cs)},
    }
