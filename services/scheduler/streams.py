"""Requests' token streams on the wire: one `Submit` call per request, or one shared `Connect`
call for all of a gateway's requests.

On a `Connect` stream each message down carries every request that has something new since
the last message: the step loop pushes a step's tokens into each request's `RequestStream`
(never waiting for the network), each stream tells the session it is ready, and the session
sends them all as one message. So a step costs one message per gateway, not one per request.
A request that fails sends a `RequestError` with its status, after the tokens it got before.
When the stream ends (the gateway went away, or cancelled), its unfinished requests are aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from pagedserve.common.errors import PagedServeError
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import logprobs_to_proto
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.output import RequestDelta, RequestStream
from pagedserve.scheduler.recovery import ChoiceProgress
from pagedserve.v1 import common_pb2, scheduler_pb2

log = logging.getLogger(__name__)


def delta_to_proto(delta: RequestDelta) -> scheduler_pb2.SubmitResponse:
    msg = scheduler_pb2.SubmitResponse(
        request_id=delta.request_id,
        choices=[
            scheduler_pb2.ChoiceTokens(
                index=c.index,
                token_ids=c.token_ids,
                logprobs=[logprobs_to_proto(lp) for lp in c.logprobs],
                finish_reason=int(c.finish_reason),
                stop_token_id=c.stop_token_id,
                cumulative_logprob=c.cumulative_logprob,
                beam_score=c.beam_score,
            )
            for c in delta.choices
        ],
    )
    if delta.usage is not None:
        msg.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=delta.usage.prompt_tokens,
                completion_tokens=delta.usage.completion_tokens,
                cached_prompt_tokens=delta.usage.cached_prompt_tokens,
            )
        )
    if delta.cached_prompt_tokens is not None:
        msg.cached_prompt_tokens = delta.cached_prompt_tokens
    if delta.prompt_logprobs:
        msg.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in delta.prompt_logprobs)
    return msg


def open_request(engine: SchedulerEngine, request: scheduler_pb2.SubmitRequest) -> RequestStream:
    """Start the request a `SubmitRequest` asks for, or re-attach it (`resume`)."""
    sampling = SamplingParams.from_proto(request.sampling)
    prompt = list(request.prompt_token_ids)
    if request.resume:
        progress = [ChoiceProgress(p.index, p.token_ids, p.finished) for p in request.progress]
        return engine.attach(request.request_id, prompt, sampling, request.priority, progress)
    return engine.submit(request.request_id, prompt, sampling, request.priority)


class ConnectSession:
    """The requests of one `Connect` stream, and the merge of their deltas into messages."""

    def __init__(self, engine: SchedulerEngine) -> None:
        self.engine = engine
        self.streams: dict[str, RequestStream] = {}  # unfinished requests of this stream
        self._ready: dict[str, RequestStream] = {}  # those with something pending (insertion order)
        self._errors: list[scheduler_pb2.RequestError] = []  # refused submits, not yet sent
        self._wake = asyncio.Event()

    async def read(self, requests: AsyncIterator[scheduler_pb2.ConnectRequest]) -> None:
        """Apply the gateway's submits and aborts until it stops sending."""
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "submit":
                self._submit(msg.submit)
            elif kind == "abort":
                self.engine.abort(msg.abort.request_id)

    def _submit(self, request: scheduler_pb2.SubmitRequest) -> None:
        try:
            stream = open_request(self.engine, request)
        except PagedServeError as err:
            self._errors.append(_error(request.request_id, err))
            self._wake.set()
            return
        self.streams[request.request_id] = stream
        stream.listen(self._on_ready)

    def _on_ready(self, stream: RequestStream) -> None:
        self._ready[stream.request_id] = stream
        self._wake.set()

    async def messages(self, reader: asyncio.Future) -> AsyncIterator[scheduler_pb2.ConnectResponse]:
        """Messages down, each with everything pending; ends when the gateway stopped sending
        (`reader` done) and none of its requests is left."""
        while True:
            if not self._ready and not self._errors:
                if reader.done() and not self.streams:
                    reader.result()  # the reader's error, if it failed
                    return
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            msg = self._collect()
            if msg.updates or msg.errors:
                yield msg

    def _collect(self) -> scheduler_pb2.ConnectResponse:
        msg = scheduler_pb2.ConnectResponse(errors=self._errors)
        self._errors = []
        ready, self._ready = self._ready, {}
        for request_id, stream in ready.items():
            while (item := stream.poll()) is not None:
                if isinstance(item, Exception):
                    msg.errors.append(_error(request_id, item))
                    self.streams.pop(request_id, None)
                    break
                msg.updates.append(delta_to_proto(item))
                if item.finished:
                    self.streams.pop(request_id, None)
                    break
        return msg

    def close(self) -> None:
        """The stream is over: abort what it leaves unfinished."""
        for request_id in list(self.streams):
            log.info("request %s: its Connect stream ended, aborting", request_id)
            self.engine.abort(request_id)
        self.streams.clear()


def _error(request_id: str, err: Exception) -> scheduler_pb2.RequestError:
    if isinstance(err, PagedServeError):
        return scheduler_pb2.RequestError(
            request_id=request_id, code=err.code, message=err.message, field=err.field or ""
        )
    return scheduler_pb2.RequestError(request_id=request_id, code="INTERNAL", message=str(err))
