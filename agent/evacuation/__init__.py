"""Host evacuation (issue 24): many VMs moved off this host as one operation (``POST /v1/host/evacuations``).

``request``: the wire body; ``records``: the journal (one JSON file per evacuation, survives a restart);
``service``: the scheduler that hands each VM to the task manager as a task of its own.
"""

from agent.evacuation.request import EvacuationCancel, EvacuationDestination, EvacuationRequest, EvacuationVm
from agent.evacuation.service import EvacuationService

__all__ = [
    "EvacuationCancel",
    "EvacuationDestination",
    "EvacuationRequest",
    "EvacuationService",
    "EvacuationVm",
]
