"""Throughput of a layer transfer against ``qemu-img convert -n`` into the same kind of NBD export.

Not a pass/fail test (machines are noisy): run with ``KSA_TRANSFER_BENCH=1 pytest -s -k bench``; it prints
the figures of one run, the methods interleaved, over plain NBD and TLS-PSK, with the CPU time all the
processes involved (source side and destination daemon) used, which is steadier than the wall clock on a
busy machine.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from pathlib import Path

import pytest
from test_transfer_support import LOOPBACK, MiB, create, needs_qemu, qemu_io

from agent.transfer.endpoint import PSK_IDENTITY, TLS_PRIORITY, NbdEndpoint
from agent.transfer.export import IncomingLayer
from agent.transfer.send import send_layer_to

pytestmark = [
    needs_qemu,
    pytest.mark.skipif(
        not os.environ.get("KSA_TRANSFER_BENCH"), reason="benchmark: set KSA_TRANSFER_BENCH=1"
    ),
    pytest.mark.timeout(3600),
]

SIZE_MIB = int(os.environ.get("KSA_TRANSFER_BENCH_MIB", "2048"))
ROUNDS = int(os.environ.get("KSA_TRANSFER_BENCH_ROUNDS", "3"))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _convert(src: str, ep: NbdEndpoint, keydir: Path) -> None:
    target = (
        f"driver=nbd,server.type=inet,server.host={ep.host},server.port={ep.port},export={ep.export_name}"
    )
    args = ["qemu-img", "convert", "-n", "-f", "qcow2"]
    if ep.psk:
        keydir.mkdir(mode=0o700)
        (keydir / "keys.psk").write_text(f"{PSK_IDENTITY}:{ep.psk}\n")
        args += [
            "--object",
            f"tls-creds-psk,id=tls0,endpoint=client,dir={keydir},username={PSK_IDENTITY},"
            f"priority={TLS_PRIORITY}",
        ]
        target += ",tls-creds=tls0"
    proc = await asyncio.create_subprocess_exec(*args, "--target-image-opts", src, target)
    assert await proc.wait() == 0


async def _one(src: str, dst: str, method: str, tls: bool) -> tuple[float, float]:
    cpu = _children_cpu()
    incoming = await IncomingLayer.prepare(dst, "qcow2", SIZE_MIB * MiB, listen_host=LOOPBACK, tls=tls)
    try:
        started = time.monotonic()
        if method == "transfer":
            await send_layer_to(src, "qcow2", incoming.endpoint, rate=lambda: None)
        else:
            await _convert(src, incoming.endpoint, Path(dst + ".psk"))
        elapsed = time.monotonic() - started
        await incoming.finish()
    finally:
        await incoming.abort()  # removes the copy: keep the disk free
    return elapsed, _children_cpu() - cpu


async def test_bench_transfer_vs_qemu_img_convert(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2", SIZE_MIB * MiB)
    qemu_io(src, f"write -P 0x5a 0 {SIZE_MIB // 2}M", f"write -P 0xa5 {SIZE_MIB // 2}M {SIZE_MIB // 2}M")
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    n = 0
    for _round in range(ROUNDS):
        for tls in (False, True):
            for method in ("convert", "transfer"):
                n += 1
                results.setdefault((method, tls), []).append(
                    await _one(src, str(tmp_path / f"dst{n}.qcow2"), method, tls)
                )
    print(f"\n{SIZE_MIB} MiB allocated layer, loopback NBD, {ROUNDS} rounds interleaved")
    for (method, tls), runs in sorted(results.items()):
        rates = [SIZE_MIB / wall for wall, _cpu in runs]
        cpus = [cpu for _wall, cpu in runs]
        print(
            f"{method:9s} {'TLS-PSK' if tls else 'plain  '} median {statistics.median(rates):5.0f} MiB/s"
            f" (runs {' '.join(f'{r:.0f}' for r in rates)}), CPU {statistics.median(cpus):.1f} s"
        )
    for tls in (False, True):
        ratio = statistics.median(SIZE_MIB / w for w, _c in results[("transfer", tls)]) / statistics.median(
            SIZE_MIB / w for w, _c in results[("convert", tls)]
        )
        print(f"transfer / convert ({'TLS-PSK' if tls else 'plain'}): {ratio:.2f}")
