"""One long-lived Detokenize stream shared by every request of the gateway.

Each request's choices are sequences keyed "request_id/index" on the stream. Items that
arrive while a batch is being written are sent together in the next `DetokenizeRequest`, so
a step that produced tokens for many requests costs one message each way, not one round trip
per token. The tokenizer answers every request with one response whose deltas follow the
items' order, so responses are matched to batches first in, first out.

When the stream breaks (the tokenizer restarted), every waiting caller gets `Unavailable`,
and so does any later call from a request that began on the broken stream: the new stream
has lost that request's decoding state. New requests open a fresh stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

import grpc

from pagedserve.common.errors import PagedServeError, Unavailable
from pagedserve.common.grpc_utils import error_from_rpc
from pagedserve.gateway.datatypes import DetokenizeItem
from pagedserve.v1 import tokenizer_pb2

log = logging.getLogger(__name__)

_MAX_GATHER_ITERATIONS = 8


@dataclass(slots=True)
class _Call:
    items: list[DetokenizeItem]
    future: asyncio.Future[list[str]]


class DetokenizeStream:
    """Multiplexes incremental detokenization of all requests over one bidi stream.

    `begin()` returns the stream generation a request must pass to every later call;
    `detokenize(items, generation)` returns one text per item, in order.
    """

    def __init__(self, stub, service: str, timeout: float) -> None:
        self._stub = stub
        self._service = service  # e.g. "tokenizer at localhost:50052", for error messages
        self._timeout = timeout
        self._generation = 0
        self._call: grpc.aio.StreamStreamCall | None = None
        self._pending: list[_Call] = []
        self._in_flight: deque[list[_Call]] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Totals for /metrics: items per batch shows how well steps of many requests share a message.
        self.num_streams_opened = 0
        self.num_batches = 0
        self.num_items = 0

    def begin(self) -> int:
        """Open the stream if needed; return its generation for a request starting now."""
        if self._call is None:
            self._generation += 1
            self.num_streams_opened += 1
            self._call = self._stub.Detokenize()
            self._pending, self._in_flight = [], deque()
            self._tasks = [
                asyncio.create_task(self._send_loop(self._call), name="detokenize-send"),
                asyncio.create_task(self._read_loop(self._call), name="detokenize-read"),
            ]
        return self._generation

    async def detokenize(self, items: list[DetokenizeItem], generation: int) -> list[str]:
        """Send `items` in the next batch and wait for their text (one string per item)."""
        future = self._enqueue(items, generation)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            self._fail(self._call, Unavailable(f"{self._service} did not answer within {self._timeout}s"))
            raise Unavailable(f"{self._service} did not answer within {self._timeout}s") from None

    def release(self, keys: list[str], generation: int) -> None:
        """Tell the tokenizer to forget sequences that ended early (abort, stop string); no wait."""
        if not keys or generation != self._generation or self._call is None:
            return
        self._enqueue([DetokenizeItem(key=k, token_ids=[], finish=True) for k in keys], generation)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _enqueue(self, items: list[DetokenizeItem], generation: int) -> asyncio.Future[list[str]]:
        if generation != self._generation or self._call is None:
            raise Unavailable(f"{self._service} is unavailable: the Detokenize stream was reset")
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        # Retrieve a failure even when the waiter has gone (cancelled, timed out, or `release`).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append(_Call(items, future))
        self._wakeup.set()
        return future

    async def _send_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                # Let the other requests woken by the same scheduler step add their items first:
                # their Submit messages arrive over a few loop iterations.
                for _ in range(_MAX_GATHER_ITERATIONS):
                    waiting = len(self._pending)
                    await asyncio.sleep(0)
                    if len(self._pending) == waiting:
                        break
                batch, self._pending = self._pending, []
                if not batch:
                    continue
                request = tokenizer_pb2.DetokenizeRequest(
                    items=[_item_to_proto(item) for c in batch for item in c.items]
                )
                self._in_flight.append(batch)
                self.num_batches += 1
                self.num_items += len(request.items)
                await call.write(request)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as err:
            self._fail(call, error_from_rpc(err, self._service))
        except Exception as err:  # a closed call raises plain errors from write
            self._fail(call, Unavailable(f"{self._service} is unavailable: {err}"))

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                response = await call.read()
                if response == grpc.aio.EOF:
                    self._fail(call, Unavailable(f"{self._service} closed the Detokenize stream"))
                    return
                if not self._in_flight:
                    self._fail(call, Unavailable(f"{self._service} sent an unexpected Detokenize answer"))
                    return
                batch = self._in_flight.popleft()
                deltas = response.deltas
                offset = 0
                for c in batch:
                    texts = [d.text for d in deltas[offset : offset + len(c.items)]]
                    offset += len(c.items)
                    if not c.future.done():
                        c.future.set_result(texts)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as err:
            self._fail(call, error_from_rpc(err, self._service))

    def _fail(self, call: grpc.aio.StreamStreamCall | None, error: PagedServeError) -> None:
        """Break `call` (if it is still the current stream) and fail everyone waiting on it."""
        if call is None or call is not self._call:
            return
        if not isinstance(error, Unavailable):
            error = Unavailable(f"{self._service} is unavailable: {error.message}")
        log.warning("Detokenize stream lost: %s", error.message)
        self._call = None
        call.cancel()
        waiting = [c for batch in self._in_flight for c in batch] + self._pending
        self._pending, self._in_flight = [], deque()
        for c in waiting:
            if not c.future.done():
                c.future.set_exception(error)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()


def _item_to_proto(item: DetokenizeItem) -> tokenizer_pb2.DetokenizeItem:
    return tokenizer_pb2.DetokenizeItem(
        key=item.key,
        prompt_token_ids=item.prompt_token_ids,
        token_ids=item.token_ids,
        finish=item.finish,
        skip_special_tokens=item.skip_special_tokens,
    )
