"""The gateway's core: one request's life from validation to the last text delta.

    1. admit (RESOURCE_EXHAUSTED when this gateway already has `max_queued_requests` in flight,
       tokenize and detokenize calls counted with generations);
    2. validate: served model, the sizes it asks for (n, stop strings) against `RequestLimits`,
       non-empty prompt, sampling params, prompt + max_tokens <= max_model_len;
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
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from pagedserve.common.errors import (
    InvalidArgument,
    NotFound,
    PagedServeError,
    ResourceExhausted,
    Unavailable,
)
from pagedserve.common.params import SamplingParams
from pagedserve.common.request_ids import check_request_id
from pagedserve.gateway.bad_words import bad_word_ids
from pagedserve.gateway.config import GatewayConfig
from pagedserve.gateway.datatypes import (
    DetokenizeItem,
    GenerationRequest,
    ModelInfo,
    Prompt,
    PromptKind,
    RequestOutput,
    TokenizerInfo,
    Usage,
)
from pagedserve.gateway.prompt_checks import (
    check_encodable,
    check_fits,
    check_limits,
    check_vocabulary,
    kept_prompt_tokens,
)
from pagedserve.gateway.request_run import RequestRun

log = logging.getLogger(__name__)

# The most ids /detokenize takes while the scheduler has never told this gateway its max_model_len.
DECODE_IDS_WITHOUT_LIMIT = 32_768
_PROMPT_FIELD = {PromptKind.TEXT: "prompt", PromptKind.TOKEN_IDS: "prompt", PromptKind.CHAT: "messages"}


class Engine:
    """Runs requests through tokenizer and scheduler; shared by the gRPC and HTTP front ends."""

    def __init__(self, config: GatewayConfig, tokenizer, scheduler, metrics=None) -> None:
        self.config = config
        self.served_model_name = config.served_model_name  # reported in every response
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.metrics = metrics
        self._in_flight: set[str] = set()
        self._tokenizing = 0  # tokenize/detokenize calls running: they hold places in the queue too
        self.draining = False  # shutting down: new requests get Unavailable
        # Requests (by their first id) cut short by `abort_in_flight`: they end with Unavailable.
        self._cut: set[str] = set()
        self._tokenizer_info: TokenizerInfo | None = None
        self._max_model_len = 0
        self._background: set[asyncio.Task] = set()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight) + self._tokenizing

    def _admit(self, count: int) -> None:
        """Unavailable while draining; ResourceExhausted when `count` more calls would put more
        than `max_queued_requests` in flight."""
        if self.draining:
            raise Unavailable("the gateway is shutting down; send the request to another gateway")
        if self.num_in_flight + count > self.config.max_queued_requests:
            raise ResourceExhausted(
                f"the gateway queue is full ({self.config.max_queued_requests} requests in flight); retry later"
            )

    @contextlib.contextmanager
    def _tokenizing_call(self):
        self._admit(1)
        self._tokenizing += 1
        try:
            yield
        finally:
            self._tokenizing -= 1

    async def tokenizer_info(self) -> TokenizerInfo:
        if self._tokenizer_info is None:
            self._tokenizer_info = await self.tokenizer.info()
        return self._tokenizer_info

    async def max_model_len(self) -> int:
        if not self._max_model_len:
            self.note_stats(await self.scheduler.stats())
        return self._max_model_len

    async def last_max_model_len(self) -> int:
        """`max_model_len`, or while the scheduler cannot be asked, the last one it told (0 when
        it never did): for answers that do not need the scheduler (tokenizing)."""
        try:
            return await self.max_model_len()
        except PagedServeError:
            return self._max_model_len

    def note_stats(self, stats) -> None:
        """Remember the scheduler's limits from any Stats answer (e.g. a /metrics scrape)."""
        if stats.max_model_len:
            self._max_model_len = stats.max_model_len

    async def list_models(self) -> list[ModelInfo]:
        """One card per served name, the reported one first; all serve the same model."""
        try:
            max_len = await self.max_model_len()
        except PagedServeError:
            max_len = self._max_model_len
        return [
            ModelInfo(name=name, max_model_len=max_len, root=self.config.model)
            for name in self.config.model_names
        ]

    def check_model(self, name: str) -> None:
        """NotFound unless `name` is empty (the served model) or one of the served names."""
        if name and name not in self.config.model_names:
            raise self.unknown_model(name)

    def unknown_model(self, name: str) -> NotFound:
        served = ", ".join(f"'{n}'" for n in self.config.model_names)
        return NotFound(f"model '{name}' is not served here; served models: {served}", field="model")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's output. Closing the iterator early aborts the request."""
        async for output in self.generate_batch([request]):
            yield output

    async def generate_batch(self, requests: list[GenerationRequest]) -> AsyncIterator[RequestOutput]:
        """Several prompts with the same sampling as one request (a completions batch): every one
        is validated and tokenized before any is submitted; choice j of prompt i comes as choice
        i * n + j; usage is summed and comes on the last output. Closing the iterator aborts all."""
        self._admit(len(requests))
        request_ids = [r.request_id or uuid.uuid4().hex for r in requests]
        for request_id in request_ids:
            check_request_id(request_id)
            if request_id in self._in_flight or request_ids.count(request_id) > 1:
                raise InvalidArgument(f"request_id '{request_id}' is already in flight", field="request_id")
        self._in_flight.update(request_ids)
        key = request_ids[0]
        try:
            prepared = await asyncio.gather(*(self.prepare(r) for r in requests))
            # A request that needs the Detokenize stream is not submitted while the tokenizer is
            # known down (detokenizing in this process, the gateway does not need it).
            if getattr(self.tokenizer.detokenizer, "remote", True):
                self.tokenizer.check_connected()
            info = await self.tokenizer_info()  # cached by prepare()
            runs = [
                RequestRun(self, request, request_id, prompt_ids, sampling, info.vocab_size).outputs()
                for request, request_id, (prompt_ids, sampling) in zip(
                    requests, request_ids, prepared, strict=True
                )
            ]
            if key not in self._cut:  # (cut while it was being tokenized: never submitted)
                outputs = runs[0] if len(runs) == 1 else self._merged(runs, requests[0].sampling.n)
                async for output in outputs:
                    yield output
            if key in self._cut:
                raise Unavailable("the gateway shut down before the request finished (--shutdown-timeout)")
        finally:
            self._cut.discard(key)
            self._in_flight.difference_update(request_ids)

    async def _merged(self, runs: list[AsyncIterator[RequestOutput]], n: int) -> AsyncIterator[RequestOutput]:
        """The outputs of several runs as they come, choices renumbered, usage summed at the end."""
        queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue()

        async def pump(index: int, run: AsyncIterator[RequestOutput]) -> None:
            try:
                async for output in run:
                    await queue.put((index, output, None))
                await queue.put((index, None, None))
            except Exception as err:  # handed to the consumer, which raises it
                await queue.put((index, None, err))

        tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
        total = Usage()
        try:
            remaining = len(runs)
            while remaining:
                index, output, error = await queue.get()
                if error is not None:
                    raise error
                if output is None:
                    remaining -= 1
                    continue
                for delta in output.choices:
                    delta.index += index * n
                if output.usage is not None:
                    total.prompt_tokens += output.usage.prompt_tokens
                    total.completion_tokens += output.usage.completion_tokens
                    total.cached_prompt_tokens += output.usage.cached_prompt_tokens
                    output.usage = None
                output.prompt_index = index
                yield output
            yield RequestOutput(request_id="", usage=total)
        finally:
            for task in tasks:
                task.cancel()
            for run in runs:
                self.close_later(run)

    async def prepare(self, request: GenerationRequest) -> tuple[list[int], SamplingParams]:
        """Validate and tokenize; raise `InvalidArgument`/`NotFound` before anything is allocated."""
        self.check_model(request.model)
        check_limits(request, self.config.limits)
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

        keep = kept_prompt_tokens(request.truncate_prompt_tokens, max_len)
        if prompt.kind is PromptKind.TOKEN_IDS:
            prompt_ids = list(prompt.token_ids)
            if keep:  # every id checked, those dropped too
                check_vocabulary(prompt_ids, info.vocab_size, "prompt")
                prompt_ids = prompt_ids[-keep:]
            if len(prompt_ids) >= max_len:  # before looking at each id
                check_fits(len(prompt_ids), sampling.max_tokens, max_len)
            if not keep:  # a truncated prompt had every id checked above
                check_vocabulary(prompt_ids, info.vocab_size, "prompt")
        else:
            prompt_ids = await self.encode(prompt)
            if not prompt_ids:
                raise InvalidArgument(f"{field} encodes to no tokens", field=field)
            if keep:
                prompt_ids = prompt_ids[-keep:]

        if request.max_tokens_to_fill:
            sampling = replace(sampling, max_tokens=max(max_len - len(prompt_ids), 1))
        if sampling.bad_words:
            sampling.validate()  # the words' count and sizes, before any is tokenized
            more = await bad_word_ids(sampling.bad_words, self.tokenizer.encode)
            sampling = replace(sampling, bad_words_token_ids=[*sampling.bad_words_token_ids, *more])
        sampling.validate(info.vocab_size)
        sampling.check_samplable(info.eos_token_ids)
        check_fits(len(prompt_ids), sampling.max_tokens, max_len)
        return prompt_ids, sampling

    async def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text or chat prompt, after the checks every one gets: a chat template
        for messages, one that takes tools for tools, the tokenizer's input byte limit."""
        token_ids, _ = await self._checked_encode(prompt, token_strs=False)
        return token_ids

    async def _checked_encode(
        self, prompt: Prompt, *, token_strs: bool
    ) -> tuple[list[int], list[str] | None]:
        if prompt.kind is PromptKind.CHAT and not prompt.messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        check_encodable(prompt, _PROMPT_FIELD[prompt.kind], await self.tokenizer_info())
        return await self._encode(prompt, token_strs)

    async def tokenize(
        self, prompt: Prompt, *, return_token_strs: bool = False
    ) -> tuple[list[int], list[str] | None]:
        """`encode` for the tokenize APIs, with each id's spelling in the vocabulary when asked:
        the call holds a place in the gateway's queue, so a flood of them is refused
        (RESOURCE_EXHAUSTED) as a flood of generations is."""
        with self._tokenizing_call():
            return await self._checked_encode(prompt, token_strs=return_token_strs)

    async def detokenize(self, token_ids: list[int], *, skip_special_tokens: bool, field: str) -> str:
        """The text of `token_ids` for the detokenize APIs, holding a place in the queue: at most
        max_model_len ids (no sequence here is longer, and the gateway may decode on its event
        loop), each in the vocabulary; errors name `field`."""
        with self._tokenizing_call():
            limit = await self.last_max_model_len() or DECODE_IDS_WITHOUT_LIMIT
            if len(token_ids) > limit:
                raise InvalidArgument(
                    f"{field} has {len(token_ids)} ids, more than max_model_len ({limit})", field=field
                )
            check_vocabulary(token_ids, (await self.tokenizer_info()).vocab_size, field)
            return await self._decode(token_ids, skip_special_tokens)

    async def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if not token_ids:
            return ""
        detokenizer = self.tokenizer.detokenizer
        item = DetokenizeItem(
            key=f"decode-{uuid.uuid4().hex}",
            token_ids=token_ids,
            finish=True,
            skip_special_tokens=skip_special_tokens,
        )
        (text,) = await detokenizer.detokenize([item], detokenizer.begin())
        return text

    async def _encode(self, prompt: Prompt, token_strs: bool) -> tuple[list[int], list[str] | None]:
        """Token ids of text or chat (and their spellings, with `token_strs`). OpenAI's `developer`
        role takes the place of `system`: a chat template that refuses it is given the messages
        again with `system` in its place."""

        async def encode(prompt: Prompt) -> tuple[list[int], list[str] | None]:
            if token_strs:
                return await self.tokenizer.encode_with_strs(prompt)
            return await self.tokenizer.encode(prompt), None

        try:
            return await encode(prompt)
        except InvalidArgument:
            if prompt.kind is not PromptKind.CHAT or not any(m.role == "developer" for m in prompt.messages):
                raise
        messages = [replace(m, role="system") if m.role == "developer" else m for m in prompt.messages]
        return await encode(replace(prompt, messages=messages))

    async def prompt_text(self, request: GenerationRequest) -> str:
        """A validated completions prompt as text (for echo): as given, or its ids decoded."""
        if request.prompt.kind is PromptKind.TEXT:
            return request.prompt.text
        token_ids = list(request.prompt.token_ids)
        return await self._decode(token_ids, request.skip_special_tokens)  # checked by `prepare`

    def start_drain(self) -> None:
        """Shutting down: refuse new requests (Unavailable); those in flight run on."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every request in flight to end; True when none is left."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.num_in_flight

    def abort_in_flight(self) -> int:
        """Cut every request still running: each is aborted in the scheduler, which ends its
        stream, and then ends with Unavailable (a stream gets a final error event). Returns
        how many scheduler requests were aborted."""
        cut = list(self._in_flight)
        self._cut.update(cut)  # first ids are among them; others are never looked up
        for request_id in cut:
            self.spawn(self.abort_quietly(request_id))
        return len(cut)

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
