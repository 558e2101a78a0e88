"""The HTTP/1.1 protocol the gateway's uvicorn speaks, with a deadline on request headers.

uvicorn has no deadline on headers: a client could open connections and trickle a header a
minute. Here a connection must send a request's whole headers within `header_timeout` seconds of
opening (or of its last response), else it is closed. Slow bodies are the app's (`read_json`).

The parser is httptools (llhttp, in C) where it is installed, as it is with pagedserve's
dependencies; h11 (pure Python) otherwise. Every streamed token is one SSE chunk written through
the protocol; httptools also parses a request's head in C. PAGEDSERVE_HTTP_PARSER=h11 or
httptools picks one (auto: httptools when installed).
"""

from __future__ import annotations

import asyncio
import logging
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed
    HttpToolsProtocol = None

log = logging.getLogger(__name__)

PARSER_ENV = "PAGEDSERVE_HTTP_PARSER"
PARSERS = ("auto", "httptools", "h11")


class _HeaderDeadline:
    """The deadline's timer, shared by both protocols (listed before uvicorn's class, so these
    methods wrap its own): armed when a connection opens or its last response ends, disarmed when
    a request's headers are complete or the connection is gone."""

    header_timeout: float
    header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _expire(self) -> None:
        self.header_deadline = None
        if self._awaiting_headers() and not self.transport.is_closing():
            log.info("closing an HTTP connection that sent no complete headers in %ss", self.header_timeout)
            self.transport.close()

    def _awaiting_headers(self) -> bool:
        return True


def _h11_protocol(header_timeout: float) -> type:
    class H11WithHeaderTimeout(_HeaderDeadline, H11Protocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _awaiting_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

    H11WithHeaderTimeout.header_timeout = header_timeout
    return H11WithHeaderTimeout


def _httptools_protocol(header_timeout: float) -> type:
    class HttpToolsWithHeaderTimeout(_HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            # A pipelined request waiting to run has sent its headers already: no deadline then.
            waiting = bool(self.pipeline)
            super().on_response_complete()
            if not waiting and not self.transport.is_closing():
                self._arm()

    HttpToolsWithHeaderTimeout.header_timeout = header_timeout
    return HttpToolsWithHeaderTimeout


def http_protocol(header_timeout: float, parser: str | None = None) -> type:
    """uvicorn's protocol class for the gateway: `parser` is httptools, h11, or auto (httptools
    when installed); by default PAGEDSERVE_HTTP_PARSER's value, else auto."""
    parser = (parser or os.environ.get(PARSER_ENV) or "auto").strip().lower()
    if parser not in PARSERS:
        raise ValueError(f"{PARSER_ENV} must be one of {', '.join(PARSERS)}, got {parser!r}")
    if parser == "httptools" and HttpToolsProtocol is None:
        raise ValueError("the httptools HTTP parser is not installed (pip install httptools)")
    if parser == "h11" or HttpToolsProtocol is None:
        return _h11_protocol(header_timeout)
    return _httptools_protocol(header_timeout)
