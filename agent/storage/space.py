"""The one free-space check before a move creates anything in a storage root.

A move needs about its estimated bytes (allocated data of every image it will write) plus 10 % for qcow2
metadata and the guest's writes during the copy, plus a fixed margin so that a root is never filled to the
last block (a full filesystem under a running mirror fails the guest's writes, not only the copy).
"""

from __future__ import annotations

import asyncio

from agent.errors import Code, PreflightFailed
from agent.storage.roots import StorageRoot

#: Bytes left free in a root after a move, whatever its size.
SPACE_MARGIN = 64 * 1024 * 1024
#: Headroom on the estimate: qcow2 metadata, and the guest's writes while the copy runs.
ESTIMATE_SLACK = 1.1


async def check_free_space(
    root: StorageRoot, needed: int, *, field: str, where: str = "", reserved: int = 0
) -> None:
    """Raise ``AGENT.NO_SPACE`` (naming ``field``) unless ``root`` has room for ``needed`` bytes beside the
    ``reserved`` bytes that moves in flight still need (counted whole: conservative)."""
    free, _total = await asyncio.to_thread(root.usage)
    free -= int(reserved * ESTIMATE_SLACK)
    wanted = int(needed * ESTIMATE_SLACK)
    if wanted + SPACE_MARGIN > free:
        held = f" ({reserved} reserved by moves in flight)" if reserved else ""
        raise PreflightFailed(
            f"storage {root.uuid}{where} has {free} bytes free{held}; the move needs about {wanted} plus a "
            f"{SPACE_MARGIN} byte margin",
            code=Code.NO_SPACE,
            field=field,
            details="free space there or pick another primary storage",
        )
