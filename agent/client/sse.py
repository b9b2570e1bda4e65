"""Server-sent events (the WHATWG event-stream format), parsed incrementally from raw bytes.

Hand-made instead of line iteration over the response: aiohttp's ``readline`` refuses lines over its buffer
limit, and a task snapshot with a large inventory can be one long ``data:`` line.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

# Bounds memory when a peer streams garbage without line breaks; a task snapshot is far smaller.
MAX_LINE_CHARS = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerEvent:
    """One dispatched event; ``data`` is the joined ``data:`` lines, ``event`` defaults to ``message``."""

    event: str
    data: str
    id: str | None = None
    retry_ms: int | None = None

    def json(self) -> Any:
        """The data decoded as JSON (the agent always sends JSON); ValueError if it is not."""
        return json.loads(self.data)


class SseParser:
    """Feed it chunks as they arrive; it returns the events completed by each chunk."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None
        self._retry: int | None = None
        self._first = True

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        self._buffer += text
        events: list[ServerEvent] = []
        while True:
            line, found = self._next_line()
            if not found:
                break
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _next_line(self) -> tuple[str, bool]:
        buf = self._buffer
        lf, cr = buf.find("\n"), buf.find("\r")
        if cr == -1 or (lf != -1 and lf < cr):
            if lf == -1:
                if len(buf) > MAX_LINE_CHARS:
                    raise ValueError(f"event-stream line longer than {MAX_LINE_CHARS} characters")
                return "", False
            self._buffer = buf[lf + 1 :]
            return buf[:lf], True
        # A lone CR ends a line too, but a CR at the very end may be the first half of a CRLF.
        if cr + 1 == len(buf):
            return "", False
        skip = 2 if buf[cr + 1] == "\n" else 1
        self._buffer = buf[cr + skip :]
        return buf[:cr], True

    def _line(self, line: str) -> ServerEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, sep, value = line.partition(":")
        if sep:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerEvent | None:
        data, name = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerEvent(
            event=name or "message", data="\n".join(data), id=self._last_id, retry_ms=self._retry
        )
