"""``scripts/setup`` on a brand-new Debian 12, so that no earlier session's packages, users or directories can
hide a missing install step (a green run on a used machine proved nothing: issue 14).

A bare ``debootstrap --variant=minbase bookworm`` root (cached; the test runs in a throw-away overlay over
it) gets only this machine's package sources, CA certificates and pip index settings, and the checkout's
git-tracked files. Inside, as the README says (as root, from the checkout): ``./scripts/setup``, twice (it is
idempotent); then, as a later boot would (``/run`` is empty again), virtlogd and libvirtd are started with the
lab's settings (those ``labkit.hostsetup`` writes for an insecure lab: qemu.conf with user and group root
and no security driver, libvirtd.conf, pid files under /run/libvirt) in a network namespace of their own,
and the QEMU driver must answer ``virsh -c qemu:///system capabilities`` and define, start and destroy a TCG
domain with no disk (SeaBIOS only). Last, the agent's command and pytest's collection must work in the
``.venv`` setup made.

The root is run without booting (``systemd-nspawn`` with a minimal PID 1): PID 1 on the project's machines is
not systemd either. When something fails, the message carries the tail of setup's output and of libvirtd's
log. Cost: the bare root once (about a minute); each run installs everything (several minutes; the packages
apt downloaded are kept between runs).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import pytest
from nspawn import (
    Container,
    bare_root,
    copy_checkout,
    give_package_sources,
    pip_env,
    restore_apt_archives,
    save_apt_archives,
)

from agent import __version__

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

CHECKOUT = "/root/kvm-storage-agent"
#: Lines of setup's output and of each daemon log that a failure message shows.
TAIL_LINES = 40
#: The lab host's address, on the root's own loopback (libvirt refuses a loopback address as migration host).
ADDRESS = "192.0.2.11"
#: One lab host's settings as ``labkit.hostsetup`` writes them for ``scripts/lab up --insecure``, written out
#: here so that they do not depend on this machine's lab (its TLS files live outside the root).
QEMU_CONF = f"""user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
migration_address = "{ADDRESS}"
migration_host = "{ADDRESS}"
"""
LIBVIRTD_CONF = f"""listen_tls = 0
listen_tcp = 1
auth_tcp = "none"
listen_addr = "{ADDRESS}"
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid = "{uuid.uuid4()}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'
DOMAIN = "ksa-fresh"
DOMAIN_XML = f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
"""
#: Run inside the root: the daemons as the lab starts them (its config files are in place), then the checks.
#: Any failure prints what the daemons logged, and the libvirt users and groups, before exiting 1.
#: Environment: DOMAIN, ADDRESS (the lab host's), TAIL (lines of each log to show).
LIBVIRT_CHECK = r"""
set -u
report() {
    echo "FAILED: $*"
    for log in /root/libvirtd.out /var/log/libvirt/libvirtd.log /root/virtlogd.out \
               /var/log/libvirt/virtlogd.log "/var/log/libvirt/qemu/$DOMAIN.log"; do
        if [ -s "$log" ]; then echo "--- the last $TAIL lines of $log:"; tail -n $TAIL "$log"; fi
    done
    echo "--- groups: $(getent group kvm libvirt libvirt-qemu | tr '\n' ' ')"
    echo "--- user: $(id libvirt-qemu 2>&1)"
    exit 1
}
step() { echo "== $*"; }
ip address add $ADDRESS/32 dev lo || report "cannot give the loopback the address $ADDRESS"
# /run is empty after every boot: whoever starts the daemons makes their run directory (the lab does too).
mkdir -p /run/libvirt
step "virtlogd, libvirtd --listen (pid files under /run/libvirt)"
virtlogd -p /run/libvirt/virtlogd.pid >/root/virtlogd.out 2>&1 &
libvirtd --listen -p /run/libvirt/libvirtd.pid >/root/libvirtd.out 2>&1 &
libvirtd=$!
for _ in $(seq 600); do
    kill -0 "$libvirtd" 2>/dev/null || report "libvirtd exited"
    virsh -c qemu:///system capabilities >/root/capabilities.xml 2>/root/virsh.err && break
    sleep 0.1
done
[ -s /root/capabilities.xml ] || report "qemu:///system did not answer within 60 s: $(cat /root/virsh.err)"
step "virsh -c qemu:///system capabilities: answered"
grep -q "<domain type='qemu'" /root/capabilities.xml || report "the capabilities offer no domain type 'qemu'"
virsh -c qemu:///system define /root/$DOMAIN.xml || report "virsh define failed"
virsh -c qemu:///system start $DOMAIN || report "virsh start failed"
state=$(virsh -c qemu:///system domstate $DOMAIN)
[ "$state" = running ] || report "the domain is $state, not running"
step "domain $DOMAIN (type qemu, SeaBIOS only): $state"
virsh -c qemu:///system destroy $DOMAIN || report "virsh destroy failed"
virsh -c qemu:///system undefine $DOMAIN || report "virsh undefine failed"
step "destroyed and undefined"
kill "$libvirtd"
wait "$libvirtd"
echo "libvirt: ok"
"""


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def fresh() -> Iterator[Container]:
    container = Container(bare_root())
    try:
        give_package_sources(container.root)
        copy_checkout(container.path(CHECKOUT))
        yield container
    finally:
        container.close()


def test_setup_on_a_brand_new_debian_brings_up_libvirt_and_the_agent(fresh: Container) -> None:
    groups = [line.split(":")[0] for line in fresh.path("/etc/group").read_text().splitlines()]
    assert "libvirt-qemu" not in groups and "libvirt" not in groups, f"the root is not brand-new: {groups}"

    started = time.monotonic()
    restore_apt_archives(fresh.root)
    setup = fresh.run_plain("./scripts/setup", cwd=CHECKOUT, network=True, env=pip_env(), timeout=2400)
    save_apt_archives(fresh.root)
    took = {"setup": time.monotonic() - started}
    setup_ok = setup.returncode == 0
    assert setup_ok, (
        f"scripts/setup exited {setup.returncode} in a brand-new Debian 12 root; its output ends:\n"
        f"{tail(setup.stdout)}"
    )
    started = time.monotonic()
    again = fresh.run_plain("./scripts/setup", cwd=CHECKOUT, network=True, env=pip_env(), timeout=600)
    took["setup again"] = time.monotonic() - started
    nothing_to_do = again.returncode == 0 and "installing" not in again.stdout
    assert nothing_to_do, (
        f"scripts/setup run a second time (exit {again.returncode}) did not find everything in place:\n"
        f"{tail(again.stdout)}"
    )

    etc = fresh.path("/etc/libvirt")
    (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
    (etc / "qemu.conf").write_text(QEMU_CONF)
    (etc / "virtlogd.conf").write_text(VIRTLOGD_CONF)
    fresh.path(f"/root/{DOMAIN}.xml").write_text(DOMAIN_XML)
    script_env = {"DOMAIN": DOMAIN, "ADDRESS": ADDRESS, "TAIL": str(TAIL_LINES)}
    started = time.monotonic()
    libvirt = fresh.run_plain("bash", "-c", LIBVIRT_CHECK, env=script_env, timeout=300)
    took["libvirt"] = time.monotonic() - started
    libvirt_up = libvirt.returncode == 0 and "libvirt: ok" in libvirt.stdout
    assert libvirt_up, (
        "after scripts/setup (exit 0), libvirt's QEMU driver is not up with the lab's settings:\n"
        f"{tail(libvirt.stdout, 3 * TAIL_LINES)}\n--- scripts/setup's output ended:\n{tail(setup.stdout, 15)}"
    )

    version = fresh.run_plain(".venv/bin/kvm-storage-agent", "--version", cwd=CHECKOUT)
    assert version.returncode == 0 and __version__ in version.stdout, version.stdout
    collected = fresh.run_plain(
        ".venv/bin/pytest", "--collect-only", "-q", "--color=no", cwd=CHECKOUT, timeout=300
    )
    assert collected.returncode == 0, f"pytest --collect-only in the root:\n{tail(collected.stdout)}"
    count = re.search(r"^(\d+) tests? collected", collected.stdout, re.MULTILINE)
    assert count is not None and int(count.group(1)) > 0, tail(collected.stdout)
    for part in ("tests/unit/", "tests/lab/", "tests/system/"):
        assert part in collected.stdout, f"nothing collected under {part}:\n{tail(collected.stdout)}"
    print("fresh root:", ", ".join(f"{step} {seconds:.0f} s" for step, seconds in took.items()))
