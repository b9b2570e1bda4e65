"""The ``kvm-storage-agent`` command: ``serve`` runs the agent; the other commands are its client.

    kvm-storage-agent serve --config /etc/kvm-storage-agent/agent.toml
    kvm-storage-agent migrate VM_UUID --agent URL --token-file F --dst-storage UUID [--wait] [--json]
    kvm-storage-agent tasks|show|watch|cancel|retune|vms|vm|host|health ...

Exit codes are listed in ``agent.cli.exits``.
"""

from .main import main

__all__ = ["main"]
