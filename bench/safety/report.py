"""The table of `scripts/guest-safety` from its raw rows (DIR/runs.jsonl, one JSON object per run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "fixed300": "virsh, fixed 300 ms (a)",
    "fixed50": "virsh, fixed 50 ms (b)",
    "schedule": "virsh, 50 ms then raised (c)",
    "drop": "virsh, (c) + back to 50 ms mid-run (d)",
    "speeds": "virsh, (c) + block-job-set-speed (e)",
    "precopy": "agent, precopy",
    "auto-converge": "agent, auto-converge",
    "auto": "agent, auto",
    "auto-kill": "agent, auto, source agent SIGKILLed in CONVERGING",
    "auto-second": "agent, auto, a second agent on the source's state directory",
    "sync-writes": "virsh, hot disk, --copy-storage-synchronous-writes, 300 ms then 500",
    "auto-hotdisk": "agent, auto, hot disk (write-blocking mode)",
}


def load(out: Path) -> list[dict[str, Any]]:
    path = out / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| cell | runs | moved | verdict = where the VM runs | harmed runs | stale-page runs | deaths"
        " | checker/writes stopped | downtime ms (median, max) | load (1 min, low-high) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in [c for c in LABELS if any(r["cell"] == c for r in rows)]:
        mine = [r for r in rows if r["cell"] == cell]
        downtimes = [r["downtime_ms"] for r in mine if r["downtime_ms"] is not None]
        shown = f"{statistics.median(downtimes):.0f}, {max(downtimes):.0f}" if downtimes else "-"
        loads = [r["loadavg"][0] for r in mine if r.get("loadavg")]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        harmed = sum(bool(r["harmed"]) for r in mine)
        lines.append(
            f"| {LABELS[cell]} | {len(mine)} | {sum(r['verdict'] == 'moved' for r in mine)}"
            f" | {sum(r['verdictTrue'] for r in mine)} of {len(mine)} | {harmed}"
            f" | {sum(r['stale_pages'] > 0 for r in mine)} | {sum(bool(r['death_lines']) for r in mine)}"
            f" | {sum(not (r['checker_ok_after'] and r['writes_after']) for r in mine)} | {shown} | {load} |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path) -> str:
    text = table(load(out))
    (out / "table.md").write_text(text)
    return text
