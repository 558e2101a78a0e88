"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n` chunks, then `data: [DONE]`."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict) -> bytes:
    """One SSE event carrying `payload` as compact JSON (one line, so no `data:` continuation)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def parse_sse(body: str) -> list[dict | str]:
    """Split an SSE body into JSON payloads (and the literal "[DONE]"); for clients and tests."""
    events: list[dict | str] = []
    for block in body.split("\n\n"):
        data = "\n".join(
            line[len("data:") :].lstrip() for line in block.splitlines() if line.startswith("data:")
        )
        if not data:
            continue
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
