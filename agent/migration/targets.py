"""Targets the caller created before the move (``MigrationRequest.targetsPrecreated``): checked, never made.

A management server that pre-creates the destination volumes (ZStack does) hands over files the agent must
neither create nor remove. Before any byte moves, each target is checked against what the move will write:
- it exists, its format is the planned one and its virtual size equals the source top's (a mirror onto a
  file of another size fails late or changes what the guest sees);
- a full copy (flatten) needs a flat target: a backing file would show through wherever the copy does not
  write;
- a top-only copy needs the target's backing chain complete (every file present and readable by qemu-img);
  on the same host the chain's content is also compared with the source's lower layers (``qemu-img
  compare``), since a shallow mirror copies only the top and trusts everything below.
"""

from __future__ import annotations

from agent.errors import Code, PreflightFailed, StorageError
from agent.storage import qemuimg
from agent.storage.qemuimg import ImageInfo

MISMATCH = Code.TARGET_MISMATCH


async def check_precreated_target(
    path: str, *, fmt: str, virtual_size: int, flatten: bool, field: str
) -> list[ImageInfo]:
    """Check one pre-created target (see the module docstring); returns its chain, top first."""
    try:
        chain = await qemuimg.backing_chain(path)
    except StorageError as err:
        raise PreflightFailed(
            f"pre-created target {path} is missing or unreadable, or its backing chain is incomplete",
            code=MISMATCH,
            field=field,
            details=err.details,
        ) from err
    top = chain[0]
    if top.format != fmt:
        raise PreflightFailed(
            f"pre-created target {path} is {top.format}; this move writes {fmt}", code=MISMATCH, field=field
        )
    if top.virtual_size != virtual_size:
        raise PreflightFailed(
            f"pre-created target {path} has a virtual size of {top.virtual_size} bytes; the source has "
            f"{virtual_size}",
            code=MISMATCH,
            field=field,
        )
    if flatten and len(chain) > 1:
        raise PreflightFailed(
            f"pre-created target {path} has a backing file ({top.backing}); a full copy needs a flat target",
            code=MISMATCH,
            field=field,
            details="create the target without a backing file, or keep the chain (withSnapshots)",
        )
    if not flatten and len(chain) < 2:
        raise PreflightFailed(
            f"pre-created target {path} has no backing file; a top-only copy needs the chain below it",
            code=MISMATCH,
            field=field,
        )
    return chain


async def check_same_content_below(
    src_chain: tuple[str, ...], target_chain: list[ImageInfo], field: str
) -> None:
    """Same host, top-only copy: the target's backing chain must read like the source's lower layers."""
    source_below, target_below = src_chain[1], target_chain[1].path
    if not await qemuimg.compare(source_below, target_below):
        raise PreflightFailed(
            f"the backing chain of pre-created target {target_chain[0].path} differs from the source's lower "
            f"layers ({target_below} against {source_below})",
            code=MISMATCH,
            field=field,
            details="a top-only copy needs an identical chain below the target",
        )
