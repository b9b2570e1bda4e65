"""Where the CLI writes: rich consoles for people, bare JSON for scripts, and the number formats.

With ``--json`` stdout carries JSON only; everything for people (progress, hints) goes elsewhere or nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console, RenderableType

# rich assumes 80 columns off a terminal; uuids in tables need more, and a pipe has no width anyway.
_PIPE_WIDTH = 200


class Output:
    """The CLI's stdout and stderr; made per run so tests (capsys) see what it writes."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.stdout = stdout
        self.console = Console(file=stdout, highlight=False, soft_wrap=True)
        if not self.console.is_terminal:
            self.console = Console(file=stdout, highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
        self.errors = Console(file=stderr, highlight=False, soft_wrap=True)
        #: What Ctrl-C leaves behind, said once if the command is interrupted (``watching``).
        self._on_interrupt: str | None = None

    @property
    def interactive(self) -> bool:
        """A terminal that a live progress bar can redraw."""
        return self.console.is_terminal and not self.json_mode

    def json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2) + "\n")
        self.stdout.flush()

    def line(self, text: str = "") -> None:
        """A plain line for people; never markup, since uuids, paths and server text may hold brackets."""
        self.console.print(text, markup=False)

    def accepted(self, answer: Any, uuid: str, *, wait: bool, heading: str) -> bool:
        """What a command that started something says: without ``wait`` the answer (JSON) or its uuid, and
        False (done); with it, ``heading`` (not in JSON mode) and True (the caller follows it)."""
        if not wait:
            if self.json_mode:
                self.json(answer)
            else:
                self.line(uuid)
            return False
        if not self.json_mode:
            self.line(heading)
        return True

    def show(self, renderable: RenderableType) -> None:
        self.console.print(renderable)

    def error(self, text: str) -> None:
        """A message for people on stderr, prefixed with the program's name."""
        self.errors.print(f"kvm-storage-agent: {text}", markup=False)

    @contextlib.contextmanager
    def watching(self, on_interrupt: str) -> Iterator[None]:
        """While the body runs, a Ctrl-C (its ``CancelledError``, or ``interrupted`` from the CLI's
        deadline) says ``on_interrupt`` on stderr, once."""
        self._on_interrupt = on_interrupt
        try:
            yield
        except asyncio.CancelledError:
            self.interrupted()
            raise
        finally:
            self._on_interrupt = None

    def interrupted(self) -> None:
        """Say what the interrupted command leaves going on (if it said), once; flush both streams."""
        if self._on_interrupt is not None:
            self.error(self._on_interrupt)
            self._on_interrupt = None
        for stream in (self.stdout, self.errors.file):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()

    def note(self, text: str) -> None:
        """A follow-up line on stderr (details, causes, hints)."""
        self.errors.print(text, markup=False)


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    size, unit = float(value), 0
    while abs(size) >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def human_rate(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else f"{human_bytes(bytes_per_second)}/s"


def human_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value: Any) -> float | None:
    """A JSON number, or None for anything else (missing, null, a string from an odd agent)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
