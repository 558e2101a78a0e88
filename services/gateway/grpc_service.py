"""The public gRPC API (`pagedserve.v1.Gateway`): protobuf in, engine dataclasses, protobuf out.

With an API key configured every call must carry the metadata `authorization: Bearer <key>`
(UNAUTHENTICATED otherwise); the health service stays open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from pagedserve.common import structured
from pagedserve.common.chat_template import (
    chat_generation_prompt,
    template_kwargs_from_json,
    template_kwargs_to_json,
)
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.grpc_utils import grpc_errors
from pagedserve.common.params import SamplingParams, early_stopping_from_proto
from pagedserve.gateway import generation_defaults
from pagedserve.gateway.datatypes import (
    ChatMessage,
    CompletedRequest,
    GenerationRequest,
    Prompt,
    PromptKind,
    RequestOutput,
    TokenLogprob,
    Usage,
    check_bearer,
)
from pagedserve.gateway.engine import Engine
from pagedserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def sampling_from_proto(
    msg: gateway_pb2.GenerateSamplingParams, defaults: Mapping[str, float] | None = None
) -> SamplingParams:
    """Unset fields take the model's `defaults` (its generation_config.json), else `SamplingParams`'
    defaults; a field set to 0 stays 0 (and may be invalid)."""
    values = {
        name: getattr(msg, name)
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "n",
            "ignore_eos",
            "logprobs",
            "min_tokens",
            "prompt_logprobs",
            "use_beam_search",
            "length_penalty",
        )
        if msg.HasField(name)
    }
    if msg.HasField("early_stopping"):
        values["early_stopping"] = early_stopping_from_proto(msg.early_stopping)
    beam = bool(values.get("use_beam_search"))
    if beam:
        values.setdefault("temperature", 0.0)  # beam search is greedy unless told otherwise (refused)
    values = {**generation_defaults.for_request(defaults, beam), **values}
    kind, spec = structured.from_proto(msg.structured) if msg.HasField("structured") else ("", "")
    return SamplingParams(
        **values,
        stop_token_ids=list(msg.stop_token_ids),
        structured_kind=kind,
        structured_spec=spec,
        logit_bias=dict(msg.logit_bias),
        allowed_token_ids=list(msg.allowed_token_ids),
        bad_words=list(msg.bad_words),
        bad_words_token_ids=[list(t.ids) for t in msg.bad_words_token_ids],
    )


def prompt_from_proto(msg: gateway_pb2.GenerateRequest | gateway_pb2.TokenizePromptRequest) -> Prompt:
    kind = msg.WhichOneof("input")
    if kind == "text":
        add_special = msg.add_special_tokens if msg.HasField("add_special_tokens") else True
        return Prompt(PromptKind.TEXT, text=msg.text, add_special_tokens=add_special)
    if kind == "token_ids":
        return Prompt(PromptKind.TOKEN_IDS, token_ids=list(msg.token_ids.ids))
    if kind == "chat":
        return Prompt(
            PromptKind.CHAT,
            messages=[
                ChatMessage(m.role, m.content, m.tool_calls_json, m.tool_call_id, m.name)
                for m in msg.chat.messages
            ],
            add_generation_prompt=chat_generation_prompt(msg.chat),
            tools_json=msg.chat.tools_json,
            continue_final_message=msg.chat.continue_final_message,
            template_kwargs_json=template_kwargs_to_json(
                template_kwargs_from_json(
                    msg.chat.chat_template_kwargs_json, "chat.chat_template_kwargs_json"
                )
            ),
        )
    kinds = "text, token_ids or chat" if isinstance(msg, gateway_pb2.GenerateRequest) else "text or chat"
    raise InvalidArgument(f"input must be set: {kinds}", field="input")


def request_from_proto(
    msg: gateway_pb2.GenerateRequest, defaults: Mapping[str, float] | None = None
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt_from_proto(msg),
        sampling=sampling_from_proto(msg.sampling, defaults),
        model=msg.model,
        stop=list(msg.stop),
        request_id=msg.request_id,
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
        priority=msg.priority,
        detokenize=msg.detokenize if msg.HasField("detokenize") else True,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        truncate_prompt_tokens=msg.truncate_prompt_tokens if msg.HasField("truncate_prompt_tokens") else None,
    )


def _logprobs_to_proto(logprobs: list[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in lp.top],
            rank=lp.rank,
        )
        for lp in logprobs
    ]


def _usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def output_to_proto(output: RequestOutput, model: str) -> gateway_pb2.GenerateResponse:
    msg = gateway_pb2.GenerateResponse(
        request_id=output.request_id,
        model=model,
        choices=[
            gateway_pb2.ChoiceDelta(
                index=d.index,
                text=d.text,
                token_ids=d.token_ids,
                logprobs=_logprobs_to_proto(d.logprobs),
                finish_reason=int(d.finish_reason),
                cumulative_logprob=d.cumulative_logprob,
                beam_score=d.beam_score,
            )
            for d in output.choices
        ],
    )
    if output.usage is not None:
        msg.usage.CopyFrom(_usage_to_proto(output.usage))
    if output.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(_logprobs_to_proto(output.prompt_logprobs.logprobs))
    return msg


def result_to_proto(result: CompletedRequest, model: str) -> gateway_pb2.GenerateResult:
    prompt = result.prompt_logprobs_by_prompt.get(0)
    return gateway_pb2.GenerateResult(
        prompt_logprobs=_logprobs_to_proto(prompt.logprobs) if prompt is not None else [],
        request_id=result.request_id,
        model=model,
        usage=_usage_to_proto(result.usage),
        choices=[
            gateway_pb2.Choice(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                logprobs=_logprobs_to_proto(c.logprobs),
                finish_reason=int(c.finish_reason),
                cumulative_logprob=c.cumulative_logprob,
                beam_score=c.beam_score,
            )
            for c in result.choices
        ],
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Thin: convert, run through the engine, convert back. A cancelled call aborts the request."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _authorize(self, context) -> None:
        api_key = self.engine.config.api_key
        if api_key:
            metadata = dict(context.invocation_metadata() or ())
            header = metadata.get("authorization")
            check_bearer(header.encode() if isinstance(header, str) else header, api_key)

    @grpc_errors
    async def Generate(self, request, context) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        self._authorize(context)
        outputs = self.engine.generate(request_from_proto(request, self.engine.config.sampling_defaults))
        model = self.engine.served_model_name
        try:
            async for output in outputs:
                yield output_to_proto(output, model)
        finally:
            self.engine.close_later(outputs)

    @grpc_errors
    async def GenerateUnary(self, request, context) -> gateway_pb2.GenerateResult:
        self._authorize(context)
        generation = request_from_proto(request, self.engine.config.sampling_defaults)
        outputs = self.engine.generate(generation)
        result: CompletedRequest | None = None
        try:
            async for output in outputs:
                if result is None:
                    result = CompletedRequest.start(output.request_id, generation.sampling.n)
                result.add(output)
        finally:
            self.engine.close_later(outputs)
        assert result is not None, "generate() always yields at least one output"
        return result_to_proto(result, self.engine.served_model_name)

    @grpc_errors
    async def Tokenize(self, request, context) -> gateway_pb2.TokenizePromptResponse:
        self._authorize(context)
        self.engine.check_model(request.model)
        if request.WhichOneof("input") == "chat" and request.HasField("add_special_tokens"):
            raise InvalidArgument(
                "add_special_tokens goes with text: a chat is tokenized as its template renders it",
                field="add_special_tokens",
            )
        token_ids, token_strs = await self.engine.tokenize(
            prompt_from_proto(request), return_token_strs=request.return_token_strs
        )
        return gateway_pb2.TokenizePromptResponse(
            token_ids=token_ids,
            max_model_len=await self.engine.last_max_model_len(),
            token_strs=token_strs or [],
        )

    @grpc_errors
    async def Detokenize(self, request, context) -> gateway_pb2.DetokenizeIdsResponse:
        self._authorize(context)
        self.engine.check_model(request.model)
        token_ids = list(request.token_ids)
        text = await self.engine.detokenize(
            token_ids, skip_special_tokens=request.skip_special_tokens, field="token_ids"
        )
        return gateway_pb2.DetokenizeIdsResponse(text=text)

    @grpc_errors
    async def ListModels(self, request, context) -> gateway_pb2.ListModelsResponse:
        self._authorize(context)
        models = await self.engine.list_models()
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.ModelCard(id=m.name, max_model_len=m.max_model_len, root=m.root) for m in models
            ]
        )
