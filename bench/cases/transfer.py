"""Case 3: cross-host transfer of one layer (~2 GiB allocated; quick mode 1 GiB): the transfer service
(`agent.transfer`: qemu-storage-daemon mirror sync=top into the destination's NBD export) against
`qemu-img convert -n` into the same kind of export, hostA to hostB over the lab link, TLS-PSK (as between
agents) and plain NBD. Both sides run inside the hosts' network namespaces (`bench.layerpeer`)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import uuid
from pathlib import Path

from bench.context import Context
from bench.labenv import REPO, BenchError, Host, MiB, measure_again_if_disturbed, run
from bench.table import Row, Target

log = logging.getLogger(__name__)

PYTHON = str(REPO / ".venv" / "bin" / "python")
TRANSFER = "transfer service (agent.transfer)"
CONVERT = "qemu-img convert -n to the NBD export"


def make_layer(path: Path, data_mib: int) -> int:
    """A standalone qcow2 layer with ``data_mib`` MiB of data (qemu-io writes at most 2 GiB - 512 at once)."""
    virtual = 2 * data_mib * MiB
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(virtual)])
    commands = []
    offset, left, pattern = 0, data_mib, 0x31
    while left > 0:
        chunk = min(left, 1024)
        commands += ["-c", f"write -P 0x{pattern:02x} {offset * MiB} {chunk * MiB}"]
        offset, left, pattern = offset + chunk, left - chunk, pattern + 1
    run(["qemu-io", "-f", "qcow2", *commands, str(path)], timeout=900)
    return virtual


async def _copy(src_host: Host, dst_host: Host, src: Path, virtual: int, method: str, tls: bool) -> float:
    dst = dst_host.root("ps2").path / f"bench-layer-{uuid.uuid4().hex[:8]}.qcow2"
    export_argv = [
        PYTHON,
        "-m",
        "bench.layerpeer",
        "export",
        str(dst),
        str(virtual),
        dst_host.migration_address,
    ]
    exporter = await asyncio.create_subprocess_exec(
        *dst_host.netns(export_argv + ([] if tls else ["--plain"])),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert exporter.stdin is not None and exporter.stdout is not None and exporter.stderr is not None
    try:
        endpoint = await asyncio.wait_for(exporter.stdout.readline(), 60)
        if not endpoint:
            raise BenchError(
                f"the export on {dst_host.name} did not start: {(await exporter.stderr.read())!r}"
            )
        sender = await asyncio.create_subprocess_exec(
            *src_host.netns([PYTHON, "-m", "bench.layerpeer", "send", method, str(src)]),
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(sender.communicate(endpoint), 900)
        if sender.returncode != 0:
            raise BenchError(f"{method} to {dst_host.name} failed: {err.decode(errors='replace')[-1500:]}")
        seconds = float(json.loads(out.decode().splitlines()[-1])["seconds"])
        exporter.stdin.write(b"finish\n")
        await exporter.stdin.drain()
        await asyncio.wait_for(exporter.communicate(), 120)
        if exporter.returncode != 0:
            raise BenchError(f"the export on {dst_host.name} did not finish cleanly")
        same = run(["qemu-img", "compare", "-q", "-U", str(src), str(dst)], check=False).returncode == 0
        if not same:
            raise BenchError(f"{method}: the copy at {dst} differs from {src}")
        return seconds
    finally:
        if exporter.returncode is None:
            exporter.kill()
            await exporter.wait()
        if dst.exists():
            os.unlink(dst)


async def run_case(ctx: Context) -> list[Row]:
    s = ctx.settings
    title = f"cross-host transfer of one {s.layer_mib / 1024:.0f} GiB layer, hostA to hostB, uncapped"
    if importlib.util.find_spec("agent.transfer.send") is None:
        return [Row("3", title, TRANSFER, "rate", "MiB/s", not_measured="transfer service not merged")]
    src_host, dst_host = ctx.lab.host("hostA"), ctx.lab.host("hostB")
    src = src_host.root("ps2").path / f"bench-layer-src-{uuid.uuid4().hex[:8]}.qcow2"
    rates: dict[tuple[str, bool], list[float]] = {}
    try:
        virtual = await asyncio.to_thread(make_layer, src, s.layer_mib)
        for rep in range(s.layer_reps):
            for tls in (True, False):
                methods = [TRANSFER, CONVERT] if rep % 2 == 0 else [CONVERT, TRANSFER]
                for method in methods:
                    kind = "transfer" if method == TRANSFER else "convert"

                    async def copy(kind: str = kind, tls: bool = tls) -> float:
                        return await _copy(src_host, dst_host, src, virtual, kind, tls)

                    os.sync()
                    # Neither agents nor libvirtd take part: their restarts do not void this one.
                    seconds = await measure_again_if_disturbed(method, copy, lambda: None, watch=())
                    rates.setdefault((method, tls), []).append(s.layer_mib / seconds)
                    log.info(
                        "case 3 rep %d: %s %s %.2f s", rep + 1, method, "TLS" if tls else "plain", seconds
                    )
    finally:
        if src.exists():
            os.unlink(src)
    ctx.raw["3"] = {
        "layerMiB": s.layer_mib,
        "ratesMiBs": {f"{m} {'tls' if t else 'plain'}": r for (m, t), r in rates.items()},
    }
    note = (
        "the transfer service's own code (agent.transfer.send / export) run in the hosts' namespaces; "
        "the agent-to-agent calls around it (agent/migration/peer/layers.py: open, finish, digest check) are "
        "not in these figures; every copy checked with qemu-img compare"
    )
    rows = []
    for tls in (True, False):
        link = "TLS-PSK" if tls else "plain NBD"
        rows.append(
            Row("3", title, f"{TRANSFER}, {link}", "rate", "MiB/s", rates.get((TRANSFER, tls), []),
                baseline=f"{CONVERT}, {link}", baseline_values=rates.get((CONVERT, tls), []),
                target=Target(low=0.9), note=note if tls else "")
        )  # fmt: skip
        rows.append(Row("3", title, f"{CONVERT}, {link}", "rate", "MiB/s", rates.get((CONVERT, tls), [])))
    return rows
