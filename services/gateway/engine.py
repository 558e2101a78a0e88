"""The gateway's core: one request's life from validation to the last text delta.

    1. admit (RESOURCE_EXHAUSTED when this gateway already has `max_queued_requests` in flight);
    2. validate: served model, non-empty prompt, sampling params, prompt + max_tokens <= max_model_len;
    3. tokenize (or take the client's ids, checked against the vocabulary);
    4. open one Submit stream to the scheduler; each message holds a step's tokens for every choice;
    5. detokenize those tokens incrementally on the gateway's shared Detokenize stream;
    6. apply stop strings per choice, holding back text that may begin one;
    7. yield `RequestOutput`s; the last carries usage;
    8. on any early end (client gone, stop string, error, timeout) abort the request in the scheduler.

Steps 1-3 are here, 4-8 in `request_run.py`. The engine sees downstream services only through
`TokenizerClient`/`SchedulerClient`-shaped objects that return dataclasses and raise
`PagedServeError`; it never touches protobuf or grpc.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from pagedserve.common.errors import InvalidArgument, NotFound, PagedServeError, ResourceExhausted
from pagedserve.common.params import SamplingParams
from pagedserve.gateway.config import GatewayConfig
from pagedserve.gateway.datatypes import (
    GenerationRequest,
    ModelInfo,
    PromptKind,
    RequestOutput,
    TokenizerInfo,
)
from pagedserve.gateway.request_run import RequestRun

log = logging.getLogger(__name__)

_PROMPT_FIELD = {PromptKind.TEXT: "prompt", PromptKind.TOKEN_IDS: "prompt", PromptKind.CHAT: "messages"}


class Engine:
    """Runs requests through tokenizer and scheduler; shared by the gRPC and HTTP front ends."""

    def __init__(self, config: GatewayConfig, tokenizer, scheduler, metrics=None) -> None:
        self.config = config
        self.served_model_name = config.served_model_name
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.metrics = metrics
        self._in_flight: set[str] = set()
        self._tokenizer_info: TokenizerInfo | None = None
        self._max_model_len = 0
        self._background: set[asyncio.Task] = set()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def tokenizer_info(self) -> TokenizerInfo:
        if self._tokenizer_info is None:
            self._tokenizer_info = await self.tokenizer.info()
        return self._tokenizer_info

    async def max_model_len(self) -> int:
        if not self._max_model_len:
            self.note_stats(await self.scheduler.stats())
        return self._max_model_len

    def note_stats(self, stats) -> None:
        """Remember the scheduler's limits from any Stats answer (e.g. a /metrics scrape)."""
        if stats.max_model_len:
            self._max_model_len = stats.max_model_len

    async def list_models(self) -> list[ModelInfo]:
        try:
            max_len = await self.max_model_len()
        except PagedServeError:
            max_len = self._max_model_len
        return [ModelInfo(name=self.served_model_name, max_model_len=max_len)]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's output. Closing the iterator early aborts the request."""
        if len(self._in_flight) >= self.config.max_queued_requests:
            raise ResourceExhausted(
                f"the gateway queue is full ({self.config.max_queued_requests} requests in flight); retry later"
            )
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._in_flight:
            raise InvalidArgument(f"request_id '{request_id}' is already in flight", field="request_id")
        self._in_flight.add(request_id)
        try:
            prompt_ids, sampling = await self.prepare(request)
            # Every request needs the Detokenize stream; do not submit when the tokenizer is known down.
            self.tokenizer.check_connected()
            info = await self.tokenizer_info()  # cached by prepare()
            run = RequestRun(self, request, request_id, prompt_ids, sampling, info.vocab_size)
            async for output in run.outputs():
                yield output
        finally:
            self._in_flight.discard(request_id)

    async def prepare(self, request: GenerationRequest) -> tuple[list[int], SamplingParams]:
        """Validate and tokenize; raise `InvalidArgument`/`NotFound` before anything is allocated."""
        if request.model and request.model != self.served_model_name:
            raise NotFound(
                f"model '{request.model}' is not served here; the served model is '{self.served_model_name}'",
                field="model",
            )
        prompt = request.prompt
        field = _PROMPT_FIELD[prompt.kind]
        if prompt.is_empty:
            raise InvalidArgument(f"{field} must not be empty", field=field)
        if any(s == "" for s in request.stop):
            raise InvalidArgument("stop strings must not be empty", field="stop")
        sampling = request.sampling
        if not request.max_tokens_to_fill:
            sampling.validate()
        info = await self.tokenizer_info()
        max_len = await self.max_model_len()

        if prompt.kind is PromptKind.TOKEN_IDS:
            prompt_ids = list(prompt.token_ids)
            bad = next((t for t in prompt_ids if not 0 <= t < info.vocab_size), None)
            if bad is not None:
                raise InvalidArgument(
                    f"prompt token id {bad} is outside the vocabulary [0, {info.vocab_size})", field="prompt"
                )
        else:
            if prompt.kind is PromptKind.CHAT and not info.has_chat_template:
                raise InvalidArgument("the served model has no chat template", field="messages")
            size = len(prompt.text.encode()) + sum(len(m.content.encode()) for m in prompt.messages)
            if info.max_input_bytes and size > info.max_input_bytes:
                raise InvalidArgument(
                    f"{field} is {size} bytes, more than the limit of {info.max_input_bytes}", field=field
                )
            prompt_ids = await self.tokenizer.encode(prompt)
            if not prompt_ids:
                raise InvalidArgument(f"{field} encodes to no tokens", field=field)

        if request.max_tokens_to_fill:
            sampling = replace(sampling, max_tokens=max(max_len - len(prompt_ids), 1))
        sampling.validate(info.vocab_size)
        if len(prompt_ids) + sampling.max_tokens > max_len:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = "
                f"{len(prompt_ids) + sampling.max_tokens} tokens is more than max_model_len={max_len}",
                field="max_tokens",
            )
        return prompt_ids, sampling

    def spawn(self, coro) -> None:
        """Run cleanup that must finish even when the caller's task is being cancelled."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close_later(self, outputs: AsyncIterator[RequestOutput]) -> None:
        """Close a `generate` iterator from a fresh task (safe inside a cancelled scope)."""
        self.spawn(_aclose_quietly(outputs))

    async def abort_quietly(self, request_id: str) -> None:
        try:
            await self.scheduler.abort(request_id)
        except PagedServeError as err:
            log.info("abort of %s not delivered: %s", request_id, err.message)

    async def drain(self) -> None:
        """Wait for pending aborts (shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.connect_timeout)


async def _aclose_quietly(outputs) -> None:
    try:
        await outputs.aclose()
    except (RuntimeError, PagedServeError) as err:  # still running elsewhere, or failed while closing
        log.debug("closing a generation stream: %s", err)
