"""The gateway's clients for the tokenizer and scheduler services.

Adapters at the edge: they speak protobuf and grpc, and hand the engine dataclasses and
`PagedServeError`s that name the service ("scheduler at host:port is unavailable: ...").
Every unary call has a deadline, and no call waits for a connection that is down
(gRPC's fail-fast default), so a dead service is reported at once instead of hanging.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.common import internal_tls
from pagedserve.common.errors import Unavailable
from pagedserve.common.grpc_utils import CLIENT_CHANNEL_OPTIONS, error_from_rpc
from pagedserve.common.params import SamplingParams
from pagedserve.common.stats import SchedulerStats
from pagedserve.gateway.datatypes import Prompt, PromptKind, TokenizerInfo
from pagedserve.gateway.detokenize import DetokenizeStream
from pagedserve.gateway.scheduler_stream import SharedStreams, SharedSubmitStream, SubmitStream
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

DOWNSTREAM_CHANNEL_OPTIONS = CLIENT_CHANNEL_OPTIONS


def _raise_if_down(channel: grpc.aio.Channel, service: str) -> None:
    """Fail before allocating anything when the channel already knows the service is down."""
    state = channel.get_state(try_to_connect=True)
    if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
        raise Unavailable(f"{service} is unavailable (connection state {state.name})")


async def _check_health(channel: grpc.aio.Channel, timeout: float) -> bool:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class TokenizerClient:
    """Encode, Info and the shared Detokenize stream of one tokenizer service."""

    def __init__(self, address: str, timeout: float, detokenize_timeout: float) -> None:
        self.service = f"tokenizer at {address}"
        self.timeout = timeout
        self.channel = internal_tls.aio_channel(address, DOWNSTREAM_CHANNEL_OPTIONS)
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)
        self.detokenizer = DetokenizeStream(self.stub, self.service, detokenize_timeout)

    async def info(self) -> TokenizerInfo:
        try:
            reply = await self.stub.Info(tokenizer_pb2.TokenizerInfoRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.service) from None
        return TokenizerInfo(
            vocab_size=reply.vocab_size,
            eos_token_ids=tuple(reply.eos_token_ids),
            has_chat_template=reply.has_chat_template,
            max_input_bytes=reply.max_input_bytes,
            chat_template_supports_tools=reply.chat_template_supports_tools,
        )

    async def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a text or chat prompt."""
        return list((await self._encode(prompt, return_token_strs=False)).token_ids)

    async def encode_with_strs(self, prompt: Prompt) -> tuple[list[int], list[str]]:
        """Token ids and each one's spelling in the vocabulary (/tokenize's `token_strs`)."""
        reply = await self._encode(prompt, return_token_strs=True)
        return list(reply.token_ids), list(reply.token_strs)

    async def _encode(self, prompt: Prompt, *, return_token_strs: bool) -> tokenizer_pb2.EncodeResponse:
        if prompt.kind is PromptKind.TEXT:
            request = tokenizer_pb2.EncodeRequest(
                text=prompt.text,
                add_special_tokens=prompt.add_special_tokens,
                return_token_strs=return_token_strs,
            )
        else:
            request = tokenizer_pb2.EncodeRequest(
                chat=tokenizer_pb2.ChatMessages(
                    messages=[
                        tokenizer_pb2.ChatMessage(
                            role=m.role,
                            content=m.content,
                            tool_calls_json=m.tool_calls_json,
                            tool_call_id=m.tool_call_id,
                            name=m.name,
                        )
                        for m in prompt.messages
                    ],
                    add_generation_prompt=prompt.add_generation_prompt,
                    tools_json=prompt.tools_json,
                    continue_final_message=prompt.continue_final_message,
                    chat_template_kwargs_json=prompt.template_kwargs_json,
                ),
                return_token_strs=return_token_strs,
            )
        try:
            return await self.stub.Encode(request, timeout=self.timeout * 10)
        except grpc.RpcError as err:
            error = error_from_rpc(err, self.service)
            # the tokenizer names fields of its own request (chat.messages.role): say which of
            # the client's it was, or none
            head = (error.field or "").removeprefix("chat.").split(".")[0]
            error.field = {"chat": "messages", "messages": "messages", "tools": "tools"}.get(head)
            raise error from None

    def check_connected(self) -> None:
        _raise_if_down(self.channel, self.service)

    async def ready(self) -> bool:
        return await _check_health(self.channel, self.timeout)

    async def close(self) -> None:
        await self.detokenizer.close()
        await self.channel.close()


class SchedulerClient:
    """Submit, Abort and Stats of a pool's scheduler: one address, or several (the active
    scheduler and its standbys, comma-separated). Calls go to the active one; `failover`
    moves to the next when it stops answering or says it is a standby."""

    def __init__(self, address: str, timeout: float, *, shared_stream: bool = True) -> None:
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("--scheduler needs at least one address")
        self.timeout = timeout
        self.channels = [internal_tls.aio_channel(a, DOWNSTREAM_CHANNEL_OPTIONS) for a in self.addresses]
        self.stubs = [scheduler_pb2_grpc.SchedulerStub(c) for c in self.channels]
        # Requests ride one Connect call per address (else one Submit call each).
        self.shared = (
            [
                SharedStreams(stub, f"scheduler at {a}")
                for stub, a in zip(self.stubs, self.addresses, strict=True)
            ]
            if shared_stream
            else None
        )
        self.active = 0

    @property
    def service(self) -> str:
        return f"scheduler at {self.addresses[self.active]}"

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.channels[self.active]

    @property
    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        return self.stubs[self.active]

    def failover(self) -> None:
        """Use the next address (a standby that may have taken the pool over)."""
        self.active = (self.active + 1) % len(self.addresses)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        priority: int,
        progress: list[tuple[int, list[int], bool]] | None = None,
    ) -> SubmitStream | SharedSubmitStream:
        """Start a request, or with `progress` (index, token ids held, finished) per choice,
        re-attach to one started on a scheduler that is gone."""
        msg = scheduler_pb2.SubmitRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling.to_proto(),
            priority=priority,
        )
        if progress is not None:
            msg.resume = True
            msg.progress.extend(
                scheduler_pb2.ChoiceProgress(index=i, token_ids=ids, finished=done)
                for i, ids, done in progress
            )
        if self.shared is not None:
            return self.shared[self.active].submit(msg)
        return SubmitStream(self.stub.Submit(msg), self.service)

    async def abort(self, request_id: str) -> bool:
        try:
            reply = await self.stub.Abort(
                scheduler_pb2.AbortRequest(request_id=request_id), timeout=self.timeout
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.service) from None
        return reply.found

    async def stats(self, timeout: float | None = None) -> SchedulerStats:
        try:
            reply = await self.stub.Stats(scheduler_pb2.StatsRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.service) from None
        return SchedulerStats.from_proto(reply)

    async def ready(self, timeout: float | None = None) -> bool:
        """Whether a scheduler reports SERVING (it holds its pool, and its executor and Redis
        answer); the first one that does becomes the active one."""
        for _ in range(len(self.addresses)):
            if await _check_health(self.channel, timeout or self.timeout):
                return True
            if len(self.addresses) == 1:
                return False
            self.failover()
        return False

    async def close(self) -> None:
        for shared in self.shared or ():
            shared.close()
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


async def close_all(*clients: TokenizerClient | SchedulerClient) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
