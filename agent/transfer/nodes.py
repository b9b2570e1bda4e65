"""blockdev-add definitions for image chains, shared by the sending side and the verification.

Every layer is opened explicitly (base first) instead of letting QEMU follow the backing file names in the
headers: the node names are ours, each layer's options are explicit, and a chain that qemu-img sees is
exactly the chain the daemon opens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.errors import StorageError
from agent.storage.qemuimg import ImageInfo
from agent.transfer.qsd import StorageDaemon

SUPPORTED_FORMATS = ("qcow2", "raw")


def check_format(fmt: str, path: str) -> None:
    if fmt not in SUPPORTED_FORMATS:
        raise StorageError(
            f"{path}: image format {fmt} cannot be transferred",
            details=f"supported formats: {', '.join(SUPPORTED_FORMATS)}",
        )


def read_only_layer(
    layer: ImageInfo, node_name: str, *, backing: str | None, force_share: bool
) -> dict[str, Any]:
    """A read-only format node over its file; ``backing`` is the node below (None: no backing)."""
    check_format(layer.format, layer.path)
    node: dict[str, Any] = {
        "driver": layer.format,
        "node-name": node_name,
        "read-only": True,
        "file": {"driver": "file", "filename": layer.path, "read-only": True},
    }
    if force_share:
        node["force-share"] = True
        node["file"]["force-share"] = True
    if layer.format == "qcow2":
        node["backing"] = backing
    return node


async def add_read_only_chain(
    daemon: StorageDaemon,
    chain: Sequence[ImageInfo],
    prefix: str,
    *,
    force_share: bool,
    with_backing: bool = True,
) -> str:
    """Open ``chain`` (top first, as qemu-img lists it) read-only; return the top's node name.

    Without ``force_share`` the open takes QEMU's shared read lock, which fails if any process (a running
    VM's active layer, a block commit into the layer) holds the image for writing: a copy is only
    consistent if nobody writes during it, and the lock also keeps writers out until we close.
    """
    layers = list(chain) if with_backing else list(chain[:1])
    below: str | None = None
    for depth in range(len(layers) - 1, -1, -1):
        name = f"{prefix}{depth}"
        await daemon.execute(
            "blockdev-add", read_only_layer(layers[depth], name, backing=below, force_share=force_share)
        )
        below = name
    assert below is not None
    return below
