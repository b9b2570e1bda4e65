"""Image transfer between hosts, one layer of a chain at a time, with QEMU's own storage daemon.

The protocol for one layer (base first, so each layer's backing already exists at the destination):

1. destination: ``layer = await IncomingLayer.prepare(path, fmt, size, listen_host=<migration address>,
   backing=<destination copy of the layer below>, cluster_size=...)``; ``layer.endpoint`` (host, port,
   export name, TLS-PSK key) goes to the source agent over the authenticated agent API.
2. source: ``await send_layer_to(src_path, fmt, endpoint, rate=..., on_progress=...)``.
3. destination: ``await layer.finish()`` (export closed, image flushed and closed), then
   ``await verify_layer(path, fmt, source_digest, backing=...)`` with the source's
   ``await layer_digest(src_path, fmt)``, computed on each side at the same time; on any failure
   ``await layer.abort()`` (everything closed, the file removed).

A layer that verified is done: a resumed task checks an existing destination layer with ``verify_layer``
instead of sending it again.

Modules, each building on the ones before: ``qsd`` (the daemon and its QMP monitor), ``endpoint`` (what the
source needs, TLS-PSK credentials), ``nodes`` (blockdev definitions of a chain), ``nbdread`` (a local NBD
reader), ``export`` (destination), ``send`` (source), ``verify`` (digest of a layer alone).

Errors, below ``agent.errors.StorageError``: ``qsd.DaemonError`` (``DaemonDied``, ``DaemonCommandFailed``)
and ``send.TransferFailed`` (a copy failed; the message names the layer).
"""

from agent.transfer.endpoint import NbdEndpoint
from agent.transfer.export import IncomingLayer, IncomingState
from agent.transfer.qsd import DaemonCommandFailed, DaemonDied, DaemonError, StorageDaemon
from agent.transfer.send import SendResult, TransferFailed, send_layer, send_layer_to
from agent.transfer.verify import LayerDigest, layer_digest, verify_layer

__all__ = [
    "DaemonCommandFailed",
    "DaemonDied",
    "DaemonError",
    "IncomingLayer",
    "IncomingState",
    "LayerDigest",
    "NbdEndpoint",
    "SendResult",
    "StorageDaemon",
    "TransferFailed",
    "layer_digest",
    "send_layer",
    "send_layer_to",
    "verify_layer",
]
