"""qemu-img as async subprocesses: chain inspection, image creation, comparison, allocation maps.

All calls take ``-U`` (force-share) where they read images a running QEMU holds open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import StorageError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ImageInfo:
    """One layer of a chain as ``qemu-img info`` sees it."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None  # the backing file name as written in the header, resolved to a full path
    backing_format: str | None
    cluster_size: int | None
    internal_snapshots: tuple[str, ...] = ()  # qcow2-internal snapshots (``qemu-img snapshot -l``)


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    data: bool
    zero: bool
    depth: int


async def run(*args: str, limit_s: float | None = None) -> str:
    """Run a command, return stdout; a non-zero exit is a ``StorageError`` with its stderr.

    ``limit_s`` bounds the wait (a hung NFS mount must not hang a task forever); the process is killed.
    """
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise StorageError(
            f"{args[0]} {args[1]} failed (exit {proc.returncode})",
            details=err.decode(errors="replace").strip()[-2000:],
        )
    return out.decode()


def _layer(entry: dict[str, Any]) -> ImageInfo:
    backing = entry.get("full-backing-filename") or entry.get("backing-filename")
    return ImageInfo(
        path=entry["filename"],
        format=entry["format"],
        virtual_size=int(entry["virtual-size"]),
        actual_size=int(entry.get("actual-size", 0)),
        backing=backing,
        backing_format=entry.get("backing-filename-format"),
        cluster_size=entry.get("cluster-size"),
        internal_snapshots=tuple(str(snap.get("name")) for snap in entry.get("snapshots") or ()),
    )


async def backing_chain(path: str, fmt: str | None = None) -> list[ImageInfo]:
    """The chain from ``path`` (first) down to its base (last). ``fmt``: the top's format, not probed (a raw
    block device's first bytes are the guest's, and may look like any format)."""
    given = ["-f", fmt] if fmt else []
    out = await run(QEMU_IMG, "info", "-U", *given, "--backing-chain", "--output=json", path, limit_s=60)
    data = json.loads(out)
    if isinstance(data, dict):
        data = [data]
    return [_layer(entry) for entry in data]


async def info(path: str, fmt: str | None = None) -> ImageInfo:
    given = ["-f", fmt] if fmt else []
    out = await run(QEMU_IMG, "info", "-U", *given, "--output=json", path, limit_s=60)
    return _layer(json.loads(out))


async def create(
    path: str,
    fmt: str,
    size: int,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    backing_may_be_missing: bool = False,
) -> None:
    """A new image; ``backing_may_be_missing``: write the pointer without opening the backing file (``-u``),
    for a top whose lower layers arrive later."""
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_format or "qcow2"]
        if backing_may_be_missing:
            args.append("-u")
    args += [path, str(size)]
    await run(*args, limit_s=60)


async def rebase_unsafe(path: str, backing: str, backing_format: str) -> None:
    """Rewrite only the backing pointer in the header (the data is already right)."""
    await run(
        QEMU_IMG, "rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", backing_format, path, limit_s=60
    )


async def compare(a: str, b: str, *, objects: Sequence[str] = ()) -> bool:
    """Guest-visible content equal (``qemu-img compare`` exit 0), different (exit 1). ``objects``:
    ``--object`` arguments the images need (an RBD key's secret)."""
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG,
        "compare",
        *objects,
        "-U",
        "-q",
        a,
        b,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await proc.communicate()
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise StorageError(f"qemu-img compare {a} {b} failed", details=err.decode(errors="replace").strip())


async def allocation_map(path: str, fmt: str | None = None) -> list[Extent]:
    """Where data is, for the whole chain (``depth`` says which layer holds it: 0 = ``path`` itself).
    ``fmt``: the top's format, not probed (see ``backing_chain``)."""
    given = ["-f", fmt] if fmt else []
    out = await run(QEMU_IMG, "map", "-U", *given, "--output=json", path, limit_s=120)
    return [
        Extent(
            int(e["start"]),
            int(e["length"]),
            bool(e["data"]),
            bool(e.get("zero", False)),
            int(e.get("depth", 0)),
        )
        for e in json.loads(out)
    ]
