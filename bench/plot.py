"""The picture of one live migration (case 4): percent, transfer rate, the controller's downtime setting and
memory remaining over time, `auto` (solid) and `precopy` (dashed) at the same dirty rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the lab machines

import matplotlib.pyplot as plt

PANELS = (
    ("percent", "progress (%)"),
    ("rateMiBs", "transfer rate (MiB/s)"),
    ("downtimeSettingMs", "downtime setting (ms)"),
    ("memoryRemainingMiB", "memory remaining (MiB)"),
)
STYLES = {"auto": ("tab:blue", "-"), "precopy": ("tab:orange", "--")}


def _outcome_label(strategy: str, outcomes: list[dict[str, Any]]) -> str:
    if not outcomes:
        return strategy
    first = outcomes[0]
    if first.get("converged"):
        return f"{strategy}: converged in {first['totalS']:.0f} s, downtime {first['downtimeMs']} ms"
    return f"{strategy}: {first.get('error') or first.get('state')} after {first['totalS']:.0f} s"


def plot_migration(data: dict[str, Any], path: Path) -> None:
    runs: dict[str, Any] = data.get("runs", {})
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 10), sharex=True)
    for strategy, run in runs.items():
        color, style = STYLES.get(strategy, ("tab:gray", ":"))
        label = _outcome_label(strategy, data.get("outcomes", {}).get(strategy, []))
        points = run["points"]
        for ax, (key, _title) in zip(axes, PANELS, strict=True):
            xs = [p["t"] for p in points if p.get(key) is not None]
            ys = [p[key] for p in points if p.get(key) is not None]
            if xs:
                ax.plot(xs, ys, color=color, linestyle=style, label=label, drawstyle="steps-post")
        converging = run["states"].get("CONVERGING")
        if converging is not None:
            for ax in axes:
                ax.axvline(converging, color=color, linestyle=":", linewidth=0.8)
    for ax, (_key, title) in zip(axes, PANELS, strict=True):
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("seconds since the request (dotted: memory phase starts)")
    fig.suptitle(
        f"{data.get('title', 'live migration')}\nguest dirtying {data.get('dirtyMiBs')} MiB/s", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
