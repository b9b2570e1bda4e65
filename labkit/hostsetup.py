"""One lab host in its namespaces: holder, bind mounts, hostname, libvirt config, virtlogd, libvirtd."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

from . import holder
from .layout import (
    AGENT_BIN,
    CA_FILE,
    HOSTS,
    LIBVIRT_DIRS,
    OPERATOR,
    OPERATOR_PKI,
    PKI_DIR,
    REPO_ROOT,
    HostSpec,
    insecure,
)
from .network import netns_file_inode
from .state import HostState
from .sysutil import (
    LabError,
    kill_pids,
    log,
    netns_inode,
    pid_alive,
    pid_cmdline,
    pid_matches,
    run,
    tail_file,
    wait_for,
    write_file,
)
from .virsh import virsh_run

HOSTS_FILE_MOUNT = "/etc/hosts"


# --- holder ----------------------------------------------------------------------------------------------


def holder_ok(host: HostSpec, hs: HostState) -> bool:
    """The recorded holder is alive, answers, and sits in the host's current network namespace."""
    return (
        pid_matches(hs.holder_pid, "labkit.holder")
        and holder.ping(host.holder_socket) == hs.holder_pid
        and hs.holder_pid is not None
        and netns_inode(hs.holder_pid) == netns_file_inode(host.netns)
    )


def start_holder(host: HostSpec, hs: HostState) -> None:
    host.dir.mkdir(parents=True, exist_ok=True)
    argv = [
        "ip",
        "netns",
        "exec",
        host.netns,
        "unshare",
        "--mount",
        "--uts",
        "--propagation",
        "private",
        "--",
    ]
    argv += [sys.executable, "-m", "labkit.holder", host.name, str(host.holder_socket)]
    with (host.dir / "holder.log").open("ab") as out:
        # ip and unshare exec (they do not fork), so this pid is the holder's. It is not waited for: it
        # outlives this command by design, and `down` stops it by pid.
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    hs.holder_pid = proc.pid
    wait_for(f"{host.name} holder", lambda: holder.ping(host.holder_socket) == proc.pid, timeout=15)
    hs.netns_inode = netns_inode(proc.pid)
    log(f"{host.name}: namespaces held by pid {proc.pid}")


def in_host(hs: HostState, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command in the host's mount, UTS and network namespaces."""
    if hs.holder_pid is None:
        raise LabError("host has no holder")
    return run(["nsenter", "-t", str(hs.holder_pid), "-m", "-u", "-n", "--", *argv], check=check)


# --- files and mounts -------------------------------------------------------------------------------------


def hosts_file_text() -> str:
    """/etc/hosts inside the lab: the hosts resolve each other's names (libvirt uses names by default)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address}\t{h.name}" for h in HOSTS]
    return "\n".join(lines) + "\n"


def libvirtd_conf(host: HostSpec, hs: HostState) -> str:
    if insecure():
        listen = 'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"'
    else:
        # TLS only, client certificates verified against the lab CA and limited to the lab's hosts (the
        # peer-to-peer migration connection) and the operator (virsh, tests) by their DN.
        allowed = ", ".join(f'"{dn}"' for dn in allowed_dns())
        listen = (
            f'listen_tls = 1\nlisten_tcp = 0\nauth_tls = "none"\ntls_no_verify_certificate = 0\n'
            f"tls_allowed_dn_list = [{allowed}]"
        )
    return f"""# written by scripts/lab for {host.name}
{listen}
listen_addr = "{host.address}"
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid = "{hs.uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""


def qemu_conf(host: HostSpec) -> str:
    # migration_host makes the destination advertise its address, not its name, for the memory and NBD
    # (disk) streams; cgroups are off because the host's /sys (remounted by `ip netns exec`) has none.
    # TLS: QEMU's migration and NBD streams use /etc/pki/qemu (the host's certificate) when the migration asks
    # for TLS, and the destination verifies the source's client certificate.
    tls = (
        ""
        if insecure()
        else 'default_tls_x509_cert_dir = "/etc/pki/qemu"\ndefault_tls_x509_verify = 1\n'
        "migrate_tls_x509_verify = 1\n"
    )
    # stdio_handler "file": QEMU appends to the guest's console file itself (libvirt opens it, O_APPEND). With
    # libvirt's default "logd" each host's virtlogd writes it and rolls it over at 2 MiB (console.log ->
    # console.log.0), counting from the size it found: the first time a guest's console passed 2 MiB, its
    # output went on in another file and the guest looked silent after a switchover (issue 21,
    # bench/safety/rotation.py). KSA_LAB_STDIO_HANDLER=logd brings that back, for that experiment only.
    stdio = os.environ.get("KSA_LAB_STDIO_HANDLER", "file")
    return f"""# written by scripts/lab for {host.name}
stdio_handler = "{stdio}"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
migration_address = "{host.address}"
migration_host = "{host.address}"
{tls}"""


# --- certificates -----------------------------------------------------------------------------------------


def pki(*args: str) -> str:
    """`kvm-storage-agent pki ...` (labkit itself stays on the standard library; the agent's CLI has
    `cryptography`)."""
    if not AGENT_BIN.exists():
        raise LabError(f"{AGENT_BIN} is missing: run scripts/setup (the lab's certificates need it)")
    return run([str(AGENT_BIN), "pki", *args]).stdout.strip()


def ensure_ca() -> None:
    """The lab CA and the operator's client certificate, made once per lab (`down` removes them)."""
    if not CA_FILE.exists():
        pki("init", str(PKI_DIR), "--cluster", f"ksa lab {PKI_DIR.parent.name}")
    if not (OPERATOR_PKI / "clientcert.pem").exists():
        pki("issue", str(PKI_DIR), "--client", OPERATOR, "--out", str(OPERATOR_PKI))


@functools.cache
def allowed_dns() -> tuple[str, ...]:
    certs = [h.private_dir("/etc/pki") / "libvirt" / "clientcert.pem" for h in HOSTS]
    return tuple(pki("dn", str(cert)) for cert in [*certs, OPERATOR_PKI / "clientcert.pem"])


def ensure_host_pki(host: HostSpec) -> None:
    """The host's key and certificate in its own /etc/pki (bind-mounted in its namespace)."""
    root = host.private_dir("/etc/pki")
    if not (root / "libvirt" / "servercert.pem").exists():
        pki("issue", str(PKI_DIR), "--host", host.name, "--address", host.address, "--out", str(root))


VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'


def prepare_files(host: HostSpec, hs: HostState) -> bool:
    """Create the per-host copies of the libvirt directories and config; return whether the config changed."""
    for system_path in LIBVIRT_DIRS:
        Path(system_path).mkdir(parents=True, exist_ok=True)  # the mount point, in every namespace
        host.private_dir(system_path).mkdir(parents=True, exist_ok=True)
    for sub in (
        "/run/libvirt/qemu",
        "/var/lib/libvirt/qemu",
        "/var/log/libvirt/qemu",
        "/var/cache/libvirt/qemu",
    ):
        (host.private_dir(str(Path(sub).parent)) / Path(sub).name).mkdir(parents=True, exist_ok=True)
    etc = host.private_dir("/etc/libvirt")
    (etc / "qemu").mkdir(exist_ok=True)
    for each in HOSTS:  # every host's DN goes into the allow list, so all certificates come first
        ensure_host_pki(each)
    changed = write_file(etc / "libvirtd.conf", libvirtd_conf(host, hs))
    changed |= write_file(etc / "qemu.conf", qemu_conf(host))
    changed |= write_file(etc / "virtlogd.conf", VIRTLOGD_CONF)
    write_file(host.dir / "hosts", hosts_file_text())
    return changed


def mount_points(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[4] for line in lines}


def ensure_mounts_and_name(host: HostSpec, hs: HostState) -> None:
    assert hs.holder_pid is not None
    present = mount_points(hs.holder_pid)
    binds = [(host.private_dir(p), p) for p in LIBVIRT_DIRS] + [(host.dir / "hosts", HOSTS_FILE_MOUNT)]
    for source, target in binds:
        if target not in present:
            in_host(hs, ["mount", "--bind", str(source), target])
    if in_host(hs, ["hostname"]).stdout.strip() != host.name:
        in_host(hs, ["hostname", host.name])


# --- daemons ----------------------------------------------------------------------------------------------


def _in_netns(pid: int | None, hs: HostState) -> bool:
    return pid is not None and netns_inode(pid) == hs.netns_inode


def virtlogd_ok(hs: HostState) -> bool:
    return pid_matches(hs.virtlogd_pid, "virtlogd") and _in_netns(hs.virtlogd_pid, hs)


def libvirtd_ok(hs: HostState) -> bool:
    return pid_matches(hs.libvirtd_pid, "libvirtd") and _in_netns(hs.libvirtd_pid, hs)


def libvirtd_answers(host: HostSpec) -> bool:
    proc = virsh_run(host.libvirt_uri, "hostname", timeout=20)  # over the network, as an operator
    return proc.returncode == 0 and proc.stdout.strip() == host.name


def spawn(host: HostSpec, argv: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    reply = holder.request(
        host.holder_socket, {"op": "spawn", "argv": argv, "log": str(log_file), "env": env}
    )
    if not reply.get("ok"):
        raise LabError(f"{host.name}: holder could not start {argv[0]}: {reply.get('error')}")
    pid = int(reply["pid"])
    _wait_exec_settled(pid)
    return pid


def _wait_exec_settled(pid: int, within_s: float = 5.0) -> None:
    """Until the new process shows its own command line (or is gone). The holder's posix_spawn returns as
    soon as the child's exec has dropped the holder's memory, before the new program's arguments are in
    place: /proc/PID/cmdline can read empty for a moment (longer for a script, whose interpreter is exec'd
    in turn), and a check by command line then took a live agent or libvirtd for one that had exited (the
    lab started a second agent, or failed a libvirtd restart, that way)."""
    deadline = time.monotonic() + within_s
    while pid_alive(pid) and time.monotonic() < deadline:
        argv = pid_cmdline(pid)
        if argv and not any("labkit.holder" in part for part in argv):
            return
        time.sleep(0.02)


def ensure_daemons(host: HostSpec, hs: HostState, restart_libvirtd: bool) -> None:
    """virtlogd first (libvirtd hands it the QEMU logs), then libvirtd; both in the foreground under the
    holder. Pid files go to the per-host /run/libvirt: the default /run/libvirtd.pid is shared by all."""
    if not virtlogd_ok(hs):
        hs.virtlogd_pid = spawn(
            host, ["virtlogd", "-p", "/run/libvirt/virtlogd.pid"], host.dir / "virtlogd.out"
        )
    if restart_libvirtd and libvirtd_ok(hs):
        log(f"{host.name}: libvirt config changed, restarting libvirtd")
        kill_pids([hs.libvirtd_pid or 0])
    if not libvirtd_ok(hs):
        argv = ["libvirtd", "--listen", "-p", "/run/libvirt/libvirtd.pid"]
        hs.libvirtd_pid = spawn(host, argv, host.dir / "libvirtd.out")
        log(f"{host.name}: libvirtd pid {hs.libvirtd_pid}")


def wait_libvirtd(host: HostSpec, hs: HostState) -> None:
    def ready() -> bool:
        if not libvirtd_ok(hs):
            tail = tail_file(host.dir / "libvirtd.out")
            raise LabError(f"{host.name}: libvirtd exited; {host.dir / 'libvirtd.out'}:\n{tail}")
        return libvirtd_answers(host)

    wait_for(f"{host.name} libvirtd on {host.libvirt_uri}", ready, timeout=90, interval=0.3)
