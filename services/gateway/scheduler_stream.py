"""A request's stream of scheduler updates: on the gateway's shared `Connect` stream to that
scheduler (the default), or on a `Submit` call of its own (`--scheduler-stream per-request`).

Either way a request sees the same thing: an async iterator of `SchedulerUpdate`s that ends
after the update carrying `usage`, or raises a `PagedServeError` (`Unavailable` when the
scheduler went away: the caller re-attaches), and `cancel()`, which aborts the request in the
scheduler when it has not finished.

The shared stream is one bidirectional call per scheduler address, opened on first use and
again after it breaks. Each message down holds every request's new tokens since the last
one, so a step costs one gRPC message per gateway instead of one per request. When the call
breaks, every request on it gets the error, and their re-attaches open the next call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from pagedserve.common.errors import PagedServeError, Unavailable
from pagedserve.common.grpc_utils import error_from_rpc, error_from_status
from pagedserve.gateway.datatypes import (
    ChoiceTokens,
    FinishReason,
    SchedulerUpdate,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

SCHEDULER_STREAMS = ("shared", "per-request")


class SubmitStream:
    """The updates of one Submit call; `cancel()` ends it from our side."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, service: str) -> None:
        self._call = call
        self._service = service

    def cancel(self) -> None:
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[SchedulerUpdate]:
        try:
            async for msg in self._call:
                yield update_from_proto(msg)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return
            raise error_from_rpc(err, self._service) from None


class _Inbox:
    """What one request has received on a shared call and not yet read."""

    __slots__ = ("items", "event", "finished")

    def __init__(self) -> None:
        self.items: list[SchedulerUpdate | PagedServeError] = []
        self.event = asyncio.Event()
        self.finished = False  # the last update (or an error) arrived

    def put(self, item: SchedulerUpdate | PagedServeError) -> None:
        self.items.append(item)
        self.event.set()


class _Connection:
    """One `Connect` call: requests go up through `outbox`, a reader task routes what comes down."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, service: str) -> None:
        self.service = service
        self.inboxes: dict[str, _Inbox] = {}
        self.outbox: asyncio.Queue[scheduler_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = stub.Connect(self._send())
        self.reader = asyncio.ensure_future(self._read())

    @property
    def broken(self) -> bool:
        return self.reader.done()

    async def _send(self) -> AsyncIterator[scheduler_pb2.ConnectRequest]:
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def _read(self) -> None:
        error: PagedServeError = Unavailable(f"{self.service} ended the shared stream")
        try:
            async for msg in self.call:
                for update in msg.updates:
                    inbox = self.inboxes.get(update.request_id)
                    if inbox is not None:
                        item = update_from_proto(update)
                        if item.usage is not None:
                            inbox.finished = True
                            del self.inboxes[update.request_id]
                        inbox.put(item)
                for err in msg.errors:
                    inbox = self.inboxes.pop(err.request_id, None)
                    if inbox is not None:
                        inbox.finished = True
                        inbox.put(error_from_status(err.code, err.message, self.service, err.field or None))
        except grpc.RpcError as err:
            # Requests' own errors come as RequestErrors; the call itself only ends in error
            # when the scheduler is gone, is a standby, or broke: all worth a re-attach
            # (which --stall-timeout bounds).
            if err.code() != grpc.StatusCode.CANCELLED or not self.call.cancelled():
                error = Unavailable(f"{self.service} is unavailable: {err.code().name}: {err.details()}")
        except asyncio.CancelledError:
            pass
        finally:
            for inbox in self.inboxes.values():  # every request still open learns the call is gone
                inbox.finished = True
                inbox.put(error)
            self.inboxes.clear()

    def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()


class SharedStreams:
    """The shared `Connect` call to one scheduler address."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, service: str) -> None:
        self._stub = stub
        self._service = service
        self._connection: _Connection | None = None

    def submit(self, msg: scheduler_pb2.SubmitRequest) -> SharedSubmitStream:
        conn = self._connection
        if conn is None or conn.broken:
            conn = self._connection = _Connection(self._stub, self._service)
        inbox = _Inbox()
        conn.inboxes[msg.request_id] = inbox
        conn.outbox.put_nowait(scheduler_pb2.ConnectRequest(submit=msg))
        return SharedSubmitStream(conn, msg.request_id, inbox)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class SharedSubmitStream:
    """One request's updates on a shared call."""

    def __init__(self, conn: _Connection, request_id: str, inbox: _Inbox) -> None:
        self._conn = conn
        self._request_id = request_id
        self._inbox = inbox

    def cancel(self) -> None:
        if self._inbox.finished or self._conn.broken:
            return
        self._inbox.finished = True
        if self._conn.inboxes.get(self._request_id) is self._inbox:
            del self._conn.inboxes[self._request_id]
        self._conn.outbox.put_nowait(
            scheduler_pb2.ConnectRequest(abort=scheduler_pb2.AbortRequest(request_id=self._request_id))
        )

    async def __aiter__(self) -> AsyncIterator[SchedulerUpdate]:
        inbox = self._inbox
        while True:
            while not inbox.items:
                inbox.event.clear()
                await inbox.event.wait()
            items, inbox.items = inbox.items, []
            for item in items:
                if isinstance(item, PagedServeError):
                    raise item
                yield item
                if item.usage is not None:
                    return


def _logprobs_from_proto(items) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in lp.top],
            rank=lp.rank if lp.HasField("rank") else None,
        )
        for lp in items
    ]


def update_from_proto(msg: scheduler_pb2.SubmitResponse) -> SchedulerUpdate:
    usage = None
    if msg.HasField("usage"):
        usage = Usage(
            prompt_tokens=msg.usage.prompt_tokens,
            completion_tokens=msg.usage.completion_tokens,
            cached_prompt_tokens=msg.usage.cached_prompt_tokens,
        )
    return SchedulerUpdate(
        choices=[
            ChoiceTokens(
                index=c.index,
                token_ids=list(c.token_ids),
                logprobs=_logprobs_from_proto(c.logprobs),
                finish_reason=FinishReason(c.finish_reason),
                cumulative_logprob=c.cumulative_logprob if c.HasField("cumulative_logprob") else None,
                beam_score=c.beam_score if c.HasField("beam_score") else None,
            )
            for c in msg.choices
        ],
        usage=usage,
        cached_prompt_tokens=msg.cached_prompt_tokens,
        prompt_logprobs=_logprobs_from_proto(msg.prompt_logprobs),
    )


RequestUpdates = SubmitStream | SharedSubmitStream  # what a scheduler client's submit returns
