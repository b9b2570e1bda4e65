"""The benchmark's result rows and their Markdown table (pure; unit tested)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.stats import Summary, paired_ratios


@dataclass(frozen=True)
class Target:
    """A bound the issue sets, on the row's ratio to its baseline or on the value itself."""

    low: float | None = None
    high: float | None = None
    on: Literal["ratio", "value"] = "ratio"

    def met(self, x: float) -> bool:
        return (self.low is None or x >= self.low) and (self.high is None or x <= self.high)

    @property
    def text(self) -> str:
        what = "ratio" if self.on == "ratio" else "value"
        if self.low is not None and self.high is not None:
            return f"{what} {fmt(self.low)}-{fmt(self.high)}"
        if self.high is not None:
            return f"{what} <= {fmt(self.high)}"
        if self.low is not None:
            return f"{what} >= {fmt(self.low)}"
        return ""


@dataclass
class Row:
    """One measured quantity of one subject (agent or a baseline), over the repetitions of one run."""

    case: str  # "1", "2", ... (the numbering)
    title: str  # what the case is, e.g. "same-host move, 2 GiB allocated"
    subject: str  # who did it: "agent", "virsh blockcopy", ...
    metric: str  # "time", "real-bytes rate / cap", ...
    unit: str  # "s", "x", "ms", "MiB/s", "" ...
    values: list[float] = field(default_factory=list)
    baseline: str | None = None  # the subject this row's ratio is taken against
    baseline_values: list[float] = field(default_factory=list)  # paired with values, same repetitions
    target: Target | None = None
    note: str = ""
    not_measured: str | None = None  # the honest reason when there is no figure

    @property
    def summary(self) -> Summary | None:
        return Summary.of(self.values)

    @property
    def ratios(self) -> list[float]:
        return paired_ratios(self.values, self.baseline_values) if self.baseline else []

    @property
    def ratio(self) -> Summary | None:
        return Summary.of(self.ratios)

    @property
    def met(self) -> bool | None:
        """Whether the median meets the target; None without a target or a figure."""
        if self.target is None:
            return None
        judged = self.ratio if self.target.on == "ratio" else self.summary
        return None if judged is None else self.target.met(judged.median)

    def to_json(self) -> dict[str, Any]:
        summary, ratio = self.summary, self.ratio
        return {
            "case": self.case,
            "title": self.title,
            "subject": self.subject,
            "metric": self.metric,
            "unit": self.unit,
            "values": self.values,
            "median": summary.median if summary else None,
            "min": summary.low if summary else None,
            "max": summary.high if summary else None,
            "n": summary.n if summary else 0,
            "baseline": self.baseline,
            "baselineValues": self.baseline_values,
            "ratios": self.ratios,
            "ratioMedian": ratio.median if ratio else None,
            "ratioMin": ratio.low if ratio else None,
            "ratioMax": ratio.high if ratio else None,
            "target": self.target.text if self.target else None,
            "met": self.met,
            "note": self.note,
            "notMeasured": self.not_measured,
        }


def fmt(x: float) -> str:
    """A number with about three significant figures, without exponent notation for everyday sizes."""
    if not math.isfinite(x):
        return str(x)
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax == 0:
        return "0"
    return f"{x:.3g}"


def _with_unit(x: float, unit: str) -> str:
    text = fmt(x)
    if unit in ("", "x"):
        return text + ("x" if unit == "x" else "")
    return f"{text} {unit}"


def _figure(summary: Summary | None, unit: str) -> tuple[str, str]:
    if summary is None:
        return "-", "-"
    spread = "" if summary.n == 1 else f"{fmt(summary.low)}-{fmt(summary.high)}"
    return _with_unit(summary.median, unit), spread


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


HEADER = (
    "Case",
    "Subject",
    "Metric",
    "Median",
    "Spread (min-max)",
    "n",
    "Ratio to",
    "Ratio",
    "Target",
    "Met",
)


def render_markdown(rows: Sequence[Row]) -> str:
    """The table, then the notes of the rows that have one (numbered, referenced from the Met column)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    notes: list[str] = []
    last_case = None
    for row in rows:
        if row.not_measured:
            median, spread = f"not measured: {row.not_measured}", ""
        else:
            median, spread = _figure(row.summary, row.unit)
        n = str(row.summary.n) if row.summary else "0"
        ratio = row.ratio
        if ratio is None:
            ratio_text = "-"
        elif ratio.n == 1:
            ratio_text = fmt(ratio.median)
        else:
            ratio_text = f"{fmt(ratio.median)} ({fmt(ratio.low)}-{fmt(ratio.high)})"
        met = {None: "", True: "yes", False: "**no**"}[row.met]
        if row.note:
            notes.append(row.note)
            met = f"{met} [{len(notes)}]".strip()
        case = f"{row.case}. {row.title}" if row.case != last_case else ""
        last_case = row.case
        cells = (
            case,
            row.subject,
            row.metric,
            median,
            spread,
            n,
            row.baseline or "",
            ratio_text,
            row.target.text if row.target else "",
            met,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {_cell(note)}" for i, note in enumerate(notes, 1))
        lines[-len(notes) :] = [line + "  " for line in lines[-len(notes) :]]  # Markdown line breaks
    return "\n".join(lines) + "\n"


def verdicts(rows: Iterable[Row]) -> list[str]:
    """One line per row with a target: met or not, with the figure."""
    out = []
    for row in rows:
        if row.target is None:
            continue
        judged = row.ratio if row.target.on == "ratio" else row.summary
        figure = "no figure" if judged is None else fmt(judged.median)
        state = {None: "not measured", True: "met", False: "NOT met"}[row.met]
        out.append(
            f"case {row.case} {row.subject} {row.metric}: {figure} (target {row.target.text}): {state}"
        )
    return out
