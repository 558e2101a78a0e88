"""Readers for the fields of a JSON request body, each naming its field in the error it raises.

A field set to null counts as missing (its default applies). Integers must fit their protobuf
field (int32 unless the caller passes other bounds), floats be finite and within float32's
range, text be valid Unicode, so that a bad value is a 400 here and never a failure later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pagedserve.common.errors import InvalidArgument, show
from pagedserve.common.request_ids import check_request_id

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
MISSING = object()
# A client's id for an HTTP request; short enough that "chatcmpl-" before it and a batch's "-i"
# after it stay within MAX_REQUEST_ID_CHARS.
HTTP_REQUEST_ID_CHARS = 128


def get_field(body: dict, name: str):
    value = body.get(name, MISSING)
    return MISSING if value is None else value


def read_int(body: dict, name: str, default, *, lo: int = INT32_MIN, hi: int = INT32_MAX, limit: str = ""):
    """An integer field in [lo, hi]; `limit` names where `hi` comes from (e.g. a flag)."""
    value = get_field(body, name)
    if value is MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {show(value)}", field=name)
    if value > hi:
        raise InvalidArgument(f"{name} must be <= {hi}{limit}, got {show(value)}", field=name)
    if value < lo:
        raise InvalidArgument(f"{name} must be >= {lo}, got {show(value)}", field=name)
    return value


def read_float(body: dict, name: str, default):
    value = get_field(body, name)
    return default if value is MISSING else check_float(name, value)


def check_float(name: str, value) -> float:
    """A finite number that fits a float32 (the wire's type), as a float; errors name `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number, got {show(value)}", field=name)
    if isinstance(value, int) and value.bit_length() > 128 or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {show(value)}", field=name)
    if abs(value) > FLOAT32_MAX:
        raise InvalidArgument(
            f"{name} must be at most {FLOAT32_MAX:.4g} in size, got {value:.4g}", field=name
        )
    return float(value)


def read_bool(body: dict, name: str, default: bool) -> bool:
    value = get_field(body, name)
    if value is MISSING:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {show(value)}", field=name)
    return value


def check_text(text: str, where: str, field: str) -> str:
    """`text` unchanged, or InvalidArgument when it cannot be UTF-8 (a lone surrogate, "\\ud800")."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidArgument(
                f"{where} is not valid Unicode: a lone surrogate \\u{ord(text[err.start]):04x} "
                f"at character {err.start}",
                field=field,
            ) from None
    return text


def read_int_list(body: dict, name: str) -> list[int]:
    value = get_field(body, name)
    if value is MISSING:
        return []
    if not is_int_list(value):
        raise InvalidArgument(f"{name} must be a list of integers", field=name)
    return value


def is_int_list(value) -> bool:
    # json.loads makes exact ints (true is a bool, not an int); map/set run at C speed.
    return isinstance(value, list) and set(map(type, value)) <= {int}


def reject(body: dict, name: str, ok, why: str) -> None:
    value = get_field(body, name)
    if value is not MISSING and not ok(value):
        raise InvalidArgument(f"{name} is not supported: {why}", field=name)


def check_object(body) -> dict:
    """The parsed body, which must be a JSON object."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def read_model(body: dict) -> str:
    """The `model` field: a served name to be checked by the engine, "" when not given."""
    model = get_field(body, "model")
    if model is MISSING:
        return ""
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string", field="model")
    return check_text(model, "model", "model")


def header_request_id(headers: Mapping[str, str]) -> str | None:
    """A valid `X-Request-Id` header, else None: what an error answered before the body was read
    (or while it was) sends back."""
    try:
        return read_request_id(headers.get("x-request-id"), {})
    except InvalidArgument:
        return None


def read_request_id(header: str | None, body: dict) -> str | None:
    """The id the client chose for an HTTP request: its `X-Request-Id` header, else the body's
    `request_id` (as vLLM reads them); None for neither. It comes back as a response header, so
    it must be one: printable ASCII, no space at either end."""
    field, value = "X-Request-Id", header
    if header is None:
        field, value = "request_id", get_field(body, "request_id")
        if value is MISSING:
            return None
        if not isinstance(value, str):
            raise InvalidArgument(f"request_id must be a string, got {show(value)}", field=field)
    check_request_id(value, field, HTTP_REQUEST_ID_CHARS)
    if not value.isascii() or value != value.strip():
        raise InvalidArgument(
            f"{field} must be ASCII without a space at either end (it is sent back as a header)", field=field
        )
    return value
