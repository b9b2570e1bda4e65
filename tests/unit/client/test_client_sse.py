"""The event-stream parser: the WHATWG rules the agent's ``/events`` endpoint relies on."""

from __future__ import annotations

import pytest

from agent.client.sse import MAX_LINE_CHARS, ServerEvent, SseParser


def parse(*chunks: bytes) -> list[ServerEvent]:
    parser = SseParser()
    events: list[ServerEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def test_one_event_with_json_data() -> None:
    (event,) = parse(b'data: {"state": "COPYING"}\n\n')
    assert event == ServerEvent(event="message", data='{"state": "COPYING"}')
    assert event.json() == {"state": "COPYING"}


def test_multi_line_data_is_joined_with_newlines() -> None:
    (event,) = parse(b"data: first\ndata:second\ndata:  third\n\n")
    assert event.data == "first\nsecond\n third"  # only one space after the colon is eaten


def test_event_name_id_and_retry() -> None:
    first, second = parse(b"event: progress\nid: 7\nretry: 1500\ndata: a\n\ndata: b\n\n")
    assert (first.event, first.id, first.retry_ms, first.data) == ("progress", "7", 1500, "a")
    # The name resets per event, the last id stays (the browser's Last-Event-ID rule).
    assert (second.event, second.id, second.data) == ("message", "7", "b")


def test_comments_and_events_without_data_are_not_dispatched() -> None:
    assert parse(b": keep-alive\n\nevent: nothing\n\n") == []


def test_empty_data_line_still_dispatches() -> None:
    (event,) = parse(b"data\n\n")
    assert event.data == ""


def test_crlf_and_lone_cr_line_endings() -> None:
    events = parse(b"data: a\r\n\r\ndata: b\r\rdata: c\n\n")
    assert [e.data for e in events] == ["a", "b", "c"]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    events = parse(b"data: a\r", b"\n\r", b"\ndata: b\n\n")
    assert [e.data for e in events] == ["a", "b"]


def test_lines_and_utf8_split_anywhere() -> None:
    raw = 'data: {"phase": "copie terminée ✓"}\n\n'.encode()
    chunks = [raw[i : i + 1] for i in range(len(raw))]
    (event,) = parse(*chunks)
    assert event.json() == {"phase": "copie terminée ✓"}


def test_leading_byte_order_mark_is_ignored() -> None:
    (event,) = parse("\ufeffdata: x\n\n".encode())
    assert event.data == "x"


def test_an_unterminated_event_at_the_end_is_not_dispatched() -> None:
    assert parse(b"data: half") == []


def test_a_line_without_end_beyond_the_limit_is_refused() -> None:
    parser = SseParser()
    with pytest.raises(ValueError, match="longer than"):
        parser.feed(b"data: " + b"x" * (MAX_LINE_CHARS + 1))
