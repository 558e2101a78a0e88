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

        tokenized = client.tokenize("def fib(n):")  # token ids and max_model_len, as generate counts
        print(client.detokenize(tokenized.token_ids))

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
seed, n, stop_token_ids, ignore_eos, logprobs, min_tokens, prompt_logprobs, logit_bias (a dict
of token id to bias), allowed_token_ids, bad_words (words the output must not contain) or
bad_words_token_ids (the same as lists of token ids), and for beam search
use_beam_search, length_penalty, early_stopping (True, False or "never"); with beam search, n
is the beam width and each choice carries `cumulative_logprob` and `beam_score`); only those given are sent, so the
gateway tells an unset field (its default) from 0. A value that does not fit its protobuf
field (an int32, an int64 seed, a finite float) or text that is not valid Unicode raises
`InvalidArgument` here, naming the field. `api_key` (default: $PAGEDSERVE_API_KEY) is sent as
`authorization: Bearer <key>` metadata on every call; `tls=True` (or `root_certificates=`
a CA's PEM) talks TLS to a gateway started with --tls-cert. Closing a stream early
(`stream.close()`, `await stream.aclose()`, `with contextlib.closing(client.stream(...))`, or
dropping the last reference to it) cancels the RPC, and the gateway aborts the request. Errors raise the `pagedserve.common.errors` classes: `InvalidArgument`, `NotFound`,
`ResourceExhausted`, `Unavailable`, `Unauthenticated` for a missing or wrong API key, or
`DeadlineExceeded` when `timeout` ran out.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from pagedserve.client_reply import (
    FINISH_REASONS,
    Choice,
    ChoiceDelta,
    GenerationDelta,
    GenerationResult,
    ModelCard,
    Tokenized,
    TokenLogprob,
    TopLogprob,
    delta_from_proto,
    result_from_proto,
    tokenized_from_proto,
)
from pagedserve.client_request import build_detokenize_request, build_request, build_tokenize_request
from pagedserve.common import errors
from pagedserve.common.grpc_utils import CHANNEL_OPTIONS, field_of
from pagedserve.common.outputs import Usage
from pagedserve.v1 import gateway_pb2, gateway_pb2_grpc

__all__ = [
    "FINISH_REASONS", "AsyncClient", "Choice", "ChoiceDelta", "Client", "DeadlineExceeded", "GenerationDelta",
    "GenerationResult", "ModelCard", "TokenLogprob", "Tokenized", "TopLogprob", "Unauthenticated", "Usage",
    "build_request", "build_tokenize_request",
]  # fmt: skip


class DeadlineExceeded(errors.PagedServeError):
    """The call ran past its `timeout`."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


class Unauthenticated(errors.PagedServeError):
    """The gateway wants an API key, and this one is missing or wrong."""

    code = "UNAUTHENTICATED"
    http_status = 401


def _error(err: grpc.RpcError) -> errors.PagedServeError:
    code, details = err.code(), err.details() or ""
    by_code = {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    }
    error = by_code.get(code, errors.PagedServeError)(details or code.name, field=field_of(err))
    error.code = code.name
    return error


# ---- clients ----


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS when asked for or given a CA (PEM bytes); None: plaintext."""
    if tls or root_certificates is not None:
        return grpc.ssl_channel_credentials(root_certificates)
    return None


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    api_key = api_key if api_key is not None else os.environ.get("PAGEDSERVE_API_KEY")
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class Client:
    """Blocking client. `timeout` (seconds) bounds each call; None waits as long as it takes.
    `api_key` (default: $PAGEDSERVE_API_KEY) for a gateway started with --api-key; `tls` (or
    `root_certificates`, the PEM of a CA to trust) for one started with --tls-cert."""

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        timeout: float | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        credentials = _credentials(tls, root_certificates)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        """Generate and wait for every choice to finish."""
        request = build_request(prompt, **kwargs)
        try:
            return result_from_proto(
                self._stub.GenerateUnary(request, timeout=self.timeout, metadata=self._metadata)
            )
        except grpc.RpcError as err:
            raise _error(err) from None

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[GenerationDelta]:
        """Yield deltas as they come; closing the iterator cancels the request."""
        call = self._stub.Generate(
            build_request(prompt, **kwargs), timeout=self.timeout, metadata=self._metadata
        )
        try:
            for msg in call:
                yield delta_from_proto(msg)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and not call.is_active():
                return
            raise _error(err) from None
        finally:
            call.cancel()

    def models(self) -> list[ModelCard]:
        try:
            reply = self._stub.ListModels(
                gateway_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        return [ModelCard(m.id, m.max_model_len, m.root) for m in reply.models]

    def tokenize(self, prompt: str | None = None, **kwargs: Any) -> Tokenized:
        """Token ids of `prompt` (or `messages=`, with `add_generation_prompt`,
        `continue_final_message` and `chat_template_kwargs`; text also takes `add_special_tokens`),
        counted as `generate` would; `return_token_strs=True` adds each id's vocabulary entry."""
        request = build_tokenize_request(prompt, **kwargs)
        try:
            reply = self._stub.Tokenize(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None
        return tokenized_from_proto(request, reply)

    def detokenize(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        """The text of `token_ids` (special tokens kept unless `skip_special_tokens=True`)."""
        request = build_detokenize_request(token_ids, **kwargs)
        try:
            return self._stub.Detokenize(request, timeout=self.timeout, metadata=self._metadata).text
        except grpc.RpcError as err:
            raise _error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; the same calls as `Client`, awaited."""

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        timeout: float | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        credentials = _credentials(tls, root_certificates)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        request = build_request(prompt, **kwargs)
        try:
            return result_from_proto(
                await self._stub.GenerateUnary(request, timeout=self.timeout, metadata=self._metadata)
            )
        except grpc.RpcError as err:
            raise _error(err) from None

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[GenerationDelta]:
        """Yield deltas as they come; `aclose()` (or leaving the loop and the iterator) cancels."""
        call = self._stub.Generate(
            build_request(prompt, **kwargs), timeout=self.timeout, metadata=self._metadata
        )
        try:
            async for msg in call:
                yield delta_from_proto(msg)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                return
            raise _error(err) from None
        finally:
            call.cancel()

    async def models(self) -> list[ModelCard]:
        try:
            reply = await self._stub.ListModels(
                gateway_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        return [ModelCard(m.id, m.max_model_len, m.root) for m in reply.models]

    async def tokenize(self, prompt: str | None = None, **kwargs: Any) -> Tokenized:
        request = build_tokenize_request(prompt, **kwargs)
        try:
            reply = await self._stub.Tokenize(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None
        return tokenized_from_proto(request, reply)

    async def detokenize(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        request = build_detokenize_request(token_ids, **kwargs)
        try:
            return (await self._stub.Detokenize(request, timeout=self.timeout, metadata=self._metadata)).text
        except grpc.RpcError as err:
            raise _error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
