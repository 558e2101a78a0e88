"""Server-sent events in OpenAI's framing."""

from __future__ import annotations

import json

from pagedserve.gateway.sse import DONE, parse_sse, sse_event


def test_event_is_one_data_line_with_compact_json() -> None:
    event = sse_event({"text": "a\nb", "n": 1, "é": "ü"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n") == 2, "newlines inside the payload must stay escaped"
    assert json.loads(event[len(b"data: ") :]) == {"text": "a\nb", "n": 1, "é": "ü"}
    assert "ü".encode() in event


def test_done_marker() -> None:
    assert DONE == b"data: [DONE]\n\n"


def test_parse_round_trip() -> None:
    body = (sse_event({"a": 1}) + sse_event({"b": [2]}) + DONE).decode()
    assert parse_sse(body) == [{"a": 1}, {"b": [2]}, "[DONE]"]
