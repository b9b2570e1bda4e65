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


def plot_rbd(
    times: dict[str, dict[str, list[float]]], used: dict[str, dict[str, list[float]]], path: Path
) -> None:
    """Case 8: per step (file -> RBD, pool -> pool), each method's time and the RBD bytes it left over the
    source's data objects (median of the repetitions; the bars' ticks are every repetition)."""
    methods = list(times)
    steps = list(next(iter(times.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for ax, (series, title) in zip(
        axes, ((times, "time (s)"), (used, "RBD used / source's data objects")), strict=True
    ):
        for i, method in enumerate(methods):
            xs = [s + (i - (len(methods) - 1) / 2) * width for s in range(len(steps))]
            values = [series[method][step] for step in steps]
            heights = [sorted(v)[len(v) // 2] if v else 0.0 for v in values]
            ax.bar(xs, heights, width, label=method)
            for x, v in zip(xs, values, strict=True):
                ax.plot([x] * len(v), v, "k_", markersize=10)
        ax.set_xticks(range(len(steps)), steps)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(1.05, color="tab:red", linestyle=":", label="target: 1.05")
    axes[0].legend(fontsize=7, loc="upper left")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
