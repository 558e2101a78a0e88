"""Errors that cross service boundaries, with the gRPC status each maps to.

The core (scheduler policy, block manager, sampler, model runner) raises these and never
imports grpc; servicers turn them into status codes at the edge (`grpc_utils.grpc_errors`),
and the HTTP layer into status codes of its own.
"""

from __future__ import annotations


def show(value) -> str:
    """A value for an error message: short, and never a huge integer's (slow, limited) digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class PagedServeError(Exception):
    """Base class: `code` is the name of a `grpc.StatusCode` member, `http_status` the HTTP answer."""

    code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(PagedServeError):
    """A request field is out of range or malformed; the message names the field and the limit."""

    code = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(PagedServeError):
    """A named thing (model, request) is not known here."""

    code = "NOT_FOUND"
    http_status = 404


class ResourceExhausted(PagedServeError):
    """A queue or limit is full right now; retrying later may work."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 429


class Unavailable(PagedServeError):
    """A service this one depends on cannot be reached; the message says which."""

    code = "UNAVAILABLE"
    http_status = 503


class FailedPrecondition(PagedServeError):
    """The callee's state does not match what the caller assumed (e.g. a changed executor epoch)."""

    code = "FAILED_PRECONDITION"
    http_status = 409


class Fenced(FailedPrecondition):
    """A writer's fencing token is no longer the pool's: another scheduler holds its lease."""
