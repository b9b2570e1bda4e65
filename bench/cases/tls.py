"""Case 6: what TLS costs (issue 17). The same writing guest (root + one data volume) moved live between the
hosts, uncapped, flattened: by the agent with TLS (the lab's agents: VIR_MIGRATE_TLS, memory and NBD mirrors
encrypted) and with the insecure switch (a second agent pair with ``insecure_transport = true`` on the same
libvirtds, labkit.agentctl.start_twin), and by plain ``virsh migrate --live --p2p --copy-storage-all`` with
and without ``--tls`` (what most operators would run instead). Runs alternate in order; total time and
downtime in one run, the agent with TLS against the agent without it and against virsh."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from typing import Any

from bench.agentrun import run_task
from bench.context import Context
from bench.labenv import BenchError, BenchGuest, Host, bench_guest
from bench.table import Row, Target
from bench.virshmigrate import virsh_migrate
from labkit import agentctl
from labkit.bodies import to_host_body
from labkit.layout import host_by_name
from labkit.state import LabState
from labkit.sysutil import kill_pids

log = logging.getLogger(__name__)

TWIN_PORT = 7072  # tests/lab/test_security.py uses 7071: the two may run at once on one lab
AGENT_TLS, AGENT_PLAIN = "agent, TLS", "agent, insecure_transport"
VIRSH_TLS, VIRSH_PLAIN = "virsh migrate --tls", "virsh migrate (plain)"
SUBJECTS = (AGENT_TLS, AGENT_PLAIN, VIRSH_TLS, VIRSH_PLAIN)
_DOWNTIME = re.compile(r"Total downtime:\s+(\d+)\s*ms")


async def _agent(ctx: Context, guest: BenchGuest, hosts: dict[str, Host]) -> dict[str, Any]:
    src = hosts[guest.host.name]
    dst = next(h for name, h in hosts.items() if name != src.name)
    body = to_host_body(dst, withDataVolumes=True, downTime=500)
    task = await run_task(ctx.lab, src, guest.uuid, body, receiver=ctx.receiver, within_s=900)
    guest.locate(ctx.lab)
    guest.drop_unused_files()
    if not task.succeeded:
        raise BenchError(f"agent migration {task.describe()}")
    return {"totalS": task.elapsed, "downtimeMs": task.view.get("downtimeMs")}


def _virsh(ctx: Context, guest: BenchGuest, tls: bool) -> dict[str, Any]:
    dst = ctx.lab.other(guest.host)
    _started, took = virsh_migrate(ctx.lab, guest, ["--p2p", *(["--tls"] if tls else [])])
    info = dst.virsh("domjobinfo", "--completed", guest.name, check=False)
    found = _DOWNTIME.search(info)
    return {"totalS": took, "downtimeMs": float(found.group(1)) if found else None}


async def run_case(ctx: Context) -> list[Row]:
    reps = ctx.settings.live_reps + 1
    title = "live hostA<->hostB, root + data volume flattened, uncapped, writing guest (256 MiB)"
    if ctx.lab.hosts[0].agent_url.startswith("http://"):
        return [Row("6", title, "-", "-", "", not_measured="the lab is insecure: run scripts/lab up (TLS)")]
    state = LabState.load()
    if state is None:
        raise BenchError("no lab state")
    twins: list[int] = []
    plain_hosts: dict[str, Host] = {}
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SUBJECTS}
    try:
        for host in ctx.lab.hosts:
            pid, url = agentctl.start_twin(
                host_by_name(host.name), state.hosts[host.name], state.ceph, TWIN_PORT
            )
            twins.append(pid)
            plain_hosts[host.name] = replace(host, agent_url=url)
        tls_hosts = {h.name: h for h in ctx.lab.hosts}
        with bench_guest(ctx.lab, "tls", data_volumes=1) as guest:
            for rep in range(reps):
                order = SUBJECTS if rep % 2 == 0 else tuple(reversed(SUBJECTS))
                for subject in order:
                    os.sync()
                    if subject == AGENT_TLS:
                        outcome = await _agent(ctx, guest, tls_hosts)
                    elif subject == AGENT_PLAIN:
                        outcome = await _agent(ctx, guest, plain_hosts)
                    else:
                        outcome = _virsh(ctx, guest, tls=subject == VIRSH_TLS)
                    results[subject].append(outcome)
                    log.info("case 6 rep %d %s: %s", rep + 1, subject, outcome)
    finally:
        kill_pids(twins, grace=30)
    ctx.raw["6"] = results
    rows = []
    totals = {s: [float(r["totalS"]) for r in results[s]] for s in SUBJECTS}
    for subject, baseline, target in (
        (AGENT_TLS, AGENT_PLAIN, Target(high=1.3)),
        (AGENT_TLS, VIRSH_TLS, None),
        (AGENT_PLAIN, VIRSH_PLAIN, None),
        (VIRSH_TLS, VIRSH_PLAIN, None),
    ):
        rows.append(
            Row("6", title, subject, "total time", "s", totals[subject], baseline=baseline,
                baseline_values=totals[baseline], target=target)
        )  # fmt: skip
    for subject in SUBJECTS:
        downtimes = [float(r["downtimeMs"]) for r in results[subject] if r["downtimeMs"] is not None]
        rows.append(Row("6", title, subject, "downtime", "ms", downtimes))
    return rows
