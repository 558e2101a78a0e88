"""What a request id may be: it names the request's Redis keys and shows in every log line and
trace of it, so it is short, printable text (no control characters, which the scheduler's step
records use as separators). A client may choose it (gRPC `request_id`, HTTP `X-Request-Id`); the
gateway checks it before anything is queued and the scheduler again on admission."""

from __future__ import annotations

from pagedserve.common.errors import InvalidArgument

MAX_REQUEST_ID_CHARS = 256


def check_request_id(request_id: str, field: str = "request_id", limit: int = MAX_REQUEST_ID_CHARS) -> None:
    """Raise `InvalidArgument` naming `field` unless `request_id` is 1 to `limit` printable characters."""
    if not request_id or len(request_id) > limit or not request_id.isprintable():
        raise InvalidArgument(
            f"{field} must be 1 to {limit} printable characters (no control characters), "
            f"got {len(request_id)} characters",
            field=field,
        )
