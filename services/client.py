"""Python SDK for the pagedserve gateway's gRPC API, sync and asyncio.

    from pagedserve.client import Client

    with Client("localhost:50051", timeout=60) as client:
        print(client.models())
        result = client.generate("def fib(n):", max_tokens=32, temperature=0)
        print(result.choices[0].text, result.usage)

        chat = client.generate(messages=[{"role": "user", "content": "Square x in Python"}], max_tokens=32)
        ids = client.generate(token_ids=[1, 2, 3], max_tokens=8, n=2, seed=0)

        for delta in client.stream("import os\\n", max_tokens=64, stop=["\\n\\n"]):
            for choice in delta.choices:
                print(choice.text, end="", flush=True)

    # asyncio
    import asyncio
    from pagedserve.client import AsyncClient

    async def main() -> None:
        async with AsyncClient("localhost:50051") as client:
            result = await client.generate("def add(a, b):", max_tokens=16, temperature=0)
            async for delta in client.stream("class Stack:", max_tokens=32):
                print(delta.choices)

    asyncio.run(main())

Sampling keywords are the fields of `pagedserve.common.params.SamplingParams` (max_tokens,
temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty,
seed, n, stop_token_ids, ignore_eos, logprobs, min_tokens). Closing a stream early
(`stream.close()`, `await stream.aclose()`, `with contextlib.closing(client.stream(...))`, or
dropping the last reference to it) cancels the RPC, and the gateway aborts the request. Errors raise the `pagedserve.common.errors` classes: `InvalidArgument`, `NotFound`,
`ResourceExhausted`, `Unavailable`, or `DeadlineExceeded` when `timeout` ran out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pagedserve.common import errors
from pagedserve.common.grpc_utils import CHANNEL_OPTIONS
from pagedserve.common.params import SamplingParams
from pagedserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2

FINISH_REASONS = {1: "stop", 2: "length", 3: "abort"}


class DeadlineExceeded(errors.PagedServeError):
    """The call ran past its `timeout`."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(slots=True)
class Choice:
    """A finished choice: all its text and token ids."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    model: str
    choices: list[Choice]
    usage: Usage


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice; `finish_reason` is set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class GenerationDelta:
    """One message of a stream; `usage` is set on the last one."""

    request_id: str
    model: str
    choices: list[ChoiceDelta]
    usage: Usage | None = None


@dataclass(slots=True)
class ModelCard:
    id: str
    max_model_len: int


# ---- conversion ----


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    stop: str | Sequence[str] | None = None,
    request_id: str = "",
    add_special_tokens: bool | None = None,
    skip_special_tokens: bool | None = None,
    add_generation_prompt: bool = True,
    priority: int = 0,
    **sampling: Any,
) -> gateway_pb2.GenerateRequest:
    """A `GenerateRequest` from exactly one of `prompt`, `token_ids` or `messages`."""
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise TypeError("pass exactly one of prompt, token_ids= or messages=")
    try:
        params = SamplingParams(**sampling)
    except TypeError as err:
        raise TypeError(f"unknown sampling argument: {err}") from None
    msg = gateway_pb2.GenerateRequest(
        model=model,
        sampling=params.to_proto(),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        request_id=request_id,
        priority=priority,
    )
    if prompt is not None:
        msg.text = prompt
    elif token_ids is not None:
        msg.token_ids.SetInParent()  # set even when empty, so the gateway says "empty", not "missing"
        msg.token_ids.ids.extend(token_ids)
    else:
        msg.chat.CopyFrom(
            tokenizer_pb2.ChatMessages(
                messages=[
                    tokenizer_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []
                ],
                add_generation_prompt=add_generation_prompt,
            )
        )
    if add_special_tokens is not None:
        msg.add_special_tokens = add_special_tokens
    if skip_special_tokens is not None:
        msg.skip_special_tokens = skip_special_tokens
    return msg


def _logprobs(items: Sequence[common_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, [TopLogprob(t.token_id, t.logprob) for t in lp.top])
        for lp in items
    ]


def _usage(msg: common_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


def _result(msg: gateway_pb2.GenerateResult) -> GenerationResult:
    return GenerationResult(
        request_id=msg.request_id,
        model=msg.model,
        choices=[
            Choice(
                c.index, c.text, list(c.token_ids), FINISH_REASONS.get(c.finish_reason), _logprobs(c.logprobs)
            )
            for c in msg.choices
        ],
        usage=_usage(msg.usage),
    )


def _delta(msg: gateway_pb2.GenerateResponse) -> GenerationDelta:
    return GenerationDelta(
        request_id=msg.request_id,
        model=msg.model,
        choices=[
            ChoiceDelta(
                c.index, c.text, list(c.token_ids), FINISH_REASONS.get(c.finish_reason), _logprobs(c.logprobs)
            )
            for c in msg.choices
        ],
        usage=_usage(msg.usage) if msg.HasField("usage") else None,
    )


def _error(err: grpc.RpcError) -> errors.PagedServeError:
    code, details = err.code(), err.details() or ""
    by_code = {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    }
    error = by_code.get(code, errors.PagedServeError)(details or code.name)
    error.code = code.name
    return error


# ---- clients ----


class Client:
    """Blocking client. `timeout` (seconds) bounds each call; None waits as long as it takes."""

    def __init__(self, address: str = "localhost:50051", *, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        """Generate and wait for every choice to finish."""
        request = build_request(prompt, **kwargs)
        try:
            return _result(self._stub.GenerateUnary(request, timeout=self.timeout))
        except grpc.RpcError as err:
            raise _error(err) from None

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[GenerationDelta]:
        """Yield deltas as they come; closing the iterator cancels the request."""
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout)
        try:
            for msg in call:
                yield _delta(msg)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and not call.is_active():
                return
            raise _error(err) from None
        finally:
            call.cancel()

    def models(self) -> list[ModelCard]:
        try:
            reply = self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise _error(err) from None
        return [ModelCard(m.id, m.max_model_len) for m in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; the same calls as `Client`, awaited."""

    def __init__(self, address: str = "localhost:50051", *, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        request = build_request(prompt, **kwargs)
        try:
            return _result(await self._stub.GenerateUnary(request, timeout=self.timeout))
        except grpc.RpcError as err:
            raise _error(err) from None

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[GenerationDelta]:
        """Yield deltas as they come; `aclose()` (or leaving the loop and the iterator) cancels."""
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout)
        try:
            async for msg in call:
                yield _delta(msg)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                return
            raise _error(err) from None
        finally:
            call.cancel()

    async def models(self) -> list[ModelCard]:
        try:
            reply = await self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise _error(err) from None
        return [ModelCard(m.id, m.max_model_len) for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
