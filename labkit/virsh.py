"""virsh on a lab host: the one wrapper the lab's own commands, the lab tests and the benchmark use.

A target is a libvirt URI (``virsh -c URI`` from the root namespace, as an operator runs it: over the lab's
TLS with the operator certificate, or plain TCP on an insecure lab) or a lab ``HostSpec``: then the call goes
to libvirtd's Unix socket inside the host's namespaces, so that it keeps working while a test has cut the
host's link (TCP when the host's holder is not there).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from .layout import HostSpec
from .state import LabState
from .sysutil import LabError, pid_matches, run

#: A libvirt URI, or a lab host reached inside its namespaces.
Target = str | HostSpec


def virsh_argv(target: Target) -> list[str]:
    """The argv that starts ``virsh`` connected to the target (without a command)."""
    if isinstance(target, str):
        return ["virsh", "-c", target]
    state = LabState.load()
    pid = state.hosts[target.name].holder_pid if state else None
    if pid is not None and pid_matches(pid, "labkit.holder"):
        return ["nsenter", "-t", str(pid), "-m", "-u", "-n", "--", "virsh", "-c", "qemu:///system"]
    return ["virsh", "-c", target.libvirt_uri]


def virsh_run(target: Target, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one virsh command; the caller reads the exit status (a timeout raises ``LabError``)."""
    return run([*virsh_argv(target), *args], check=False, timeout=timeout)


def virsh(
    target: Target,
    *args: str,
    check: bool = True,
    timeout: float = 120,
    failure: Callable[[str], Exception] = LabError,
) -> str:
    """virsh's stdout; with ``check``, a failed command raises ``failure(message)`` naming the command
    and its stderr (``LabError`` by default; tests want ``AssertionError``, the benchmark its own error)."""
    argv = [*virsh_argv(target), *args]
    proc = run(argv, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise failure(f"{' '.join(argv)}: exit {proc.returncode}: {detail}")
    return proc.stdout


def virsh_output(target: Target, *args: str, timeout: float = 60) -> str:
    """stdout and stderr together, whatever the exit status: ``blockjob --info`` prints its progress line on
    stderr."""
    proc = virsh_run(target, *args, timeout=timeout)
    return proc.stdout + proc.stderr
