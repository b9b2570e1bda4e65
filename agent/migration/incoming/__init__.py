"""The destination side of a move to another host: the wire format the source sends (``wire``), the service
that prepares, commits or aborts (``service``), the domain a source may define (``domain``), its records on
disk (``records``) and their settling at start (``reconcile``)."""

from agent.migration.incoming.service import IncomingLimits, IncomingService
from agent.migration.peer.wire import IncomingDisk, IncomingLayer, IncomingSpec

__all__ = ["IncomingDisk", "IncomingLayer", "IncomingLimits", "IncomingService", "IncomingSpec"]
