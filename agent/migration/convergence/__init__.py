"""Convergence of a live migration's memory phase: what to do after each job-stats sample (pure logic).

The engine samples libvirt's job statistics every 0.5-1 s, builds a ``MigrationSample`` and hands it to a
``ConvergenceController``, which answers with ``Action``s: set the allowed downtime or the bandwidth, switch
to post-copy, pause the guest (only when allowed) or abort with a ``ConvergenceVerdict``. Every decision
comes with a ``Note`` holding the figures behind it, for the log and the task's report.

Why (LAB-NOTES, TCG guest, QEMU 7.2): a guest that keeps rewriting a 48 MiB buffer over a 5 MiB/s link leaves
28-50 MiB to send after every pass, and an auto-converge throttle of 80 % changes nothing, because the working
set, not the guest's CPU, bounds it; only more downtime, more bandwidth or post-copy finish it. A guest whose
dirtying is bound by its CPU dirties less as the throttle rises. ``auto`` tells the two apart in a few passes
when the dirty rate shows the guest's speed; when a guest rewrites its working set within every pass, the
rate reads as the link's whatever the guest does (lab: a CPU-bound guest over 20 MiB/s shrank only from a
70 % throttle on), and ``auto`` lets the throttle climb to ``throttle_judge_pct`` before it judges.

QEMU's counters: ``memory_iteration`` counts dirty-bitmap syncs: 0 before the memory phase (libvirt's disk
mirrors come first), 1 during the first full pass, n during the n-th pass. ``memory_remaining`` jumps at each
sync (the pages dirtied during the pass before) and falls as pages are sent, so the highest value seen in a
pass is what the guest re-dirtied while the previous pass ran: its working set at that rate.

Modules, in the order a sample travels: ``samples`` (the reading), ``policy`` (what the request allows;
``floor``: the least downtime ``auto`` starts at where QEMU harms guests switched over at less),
``actions`` (the answers and the verdict), ``passes`` (per-pass peaks, rates, the estimate), ``auto`` (the
``auto`` strategy's judgement), ``controller`` (state, retunes, the way out), ``report`` (the summary).
"""

from agent.migration.convergence.actions import (
    Abort,
    Action,
    ConvergenceVerdict,
    Figures,
    Note,
    PauseGuest,
    SetBandwidth,
    SetDowntime,
    StartPostCopy,
    VerdictKind,
)
from agent.migration.convergence.controller import (
    DISKS_CAUGHT_UP_BYTES,
    KEEP,
    ControllerState,
    ConvergenceController,
)
from agent.migration.convergence.policy import MAX_THROTTLE_PCT, ConvergencePolicy
from agent.migration.convergence.report import summarise
from agent.migration.convergence.samples import DEFAULT_PAGE_SIZE, MigrationSample

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DISKS_CAUGHT_UP_BYTES",
    "KEEP",
    "MAX_THROTTLE_PCT",
    "Abort",
    "Action",
    "ControllerState",
    "ConvergenceController",
    "ConvergencePolicy",
    "ConvergenceVerdict",
    "Figures",
    "MigrationSample",
    "Note",
    "PauseGuest",
    "SetBandwidth",
    "SetDowntime",
    "StartPostCopy",
    "VerdictKind",
    "summarise",
]
