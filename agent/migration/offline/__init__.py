"""Offline migration: the storage of a VM that is shut off, to another root on this host (``local``) or to
another host (``topeer``). Nothing runs from the images, so every layer is just a file to copy."""

from agent.config import AgentConfig
from agent.migration.offline.base import OfflineEngine
from agent.migration.offline.local import LocalOfflineEngine
from agent.migration.offline.topeer import PeerOfflineEngine
from agent.storage.roots import StorageRoots
from agent.virt.host import VirtHost

__all__ = ["LocalOfflineEngine", "OfflineEngine", "PeerOfflineEngine", "offline_engine"]


def offline_engine(
    host: VirtHost, roots: StorageRoots, config: AgentConfig, *, same_host: bool
) -> OfflineEngine:
    return (LocalOfflineEngine if same_host else PeerOfflineEngine)(host, roots, config)
