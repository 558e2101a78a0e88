"""The Tokenizer gRPC service: protobuf in, `ServedTokenizer` calls, protobuf out.

Encode and Decode run on one worker thread, so a megabyte of text does not stall the
event loop (and the open Detokenize streams with it); one thread because a Hugging Face
tokenizer is not meant to be called from several threads at once. Detokenize steps are a
few ids each and run on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from pagedserve.common.chat_template import chat_generation_prompt, template_kwargs_from_json
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.grpc_utils import grpc_errors
from pagedserve.common.json_text import load_json_text
from pagedserve.common.models import served_model_name
from pagedserve.tokenizer.core import ChatMessage, ServedTokenizer
from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer
from pagedserve.v1 import tokenizer_pb2 as pb
from pagedserve.v1 import tokenizer_pb2_grpc

SERVICE_NAME = "pagedserve.v1.Tokenizer"
T = TypeVar("T")


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Stateless except for each open Detokenize stream's sequences, which die with it."""

    def __init__(self, tokenizer: ServedTokenizer) -> None:
        self.tokenizer = tokenizer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    @grpc_errors
    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        which = request.WhichOneof("input")
        if which == "chat":
            messages = [
                ChatMessage(m.role, m.content, m.tool_calls_json, m.tool_call_id, m.name)
                for m in request.chat.messages
            ]
            chat = request.chat
            tools = _tools(chat.tools_json)
            kwargs = template_kwargs_from_json(chat.chat_template_kwargs_json)
            encoding = await self._run(
                lambda: self.tokenizer.encode(
                    messages,
                    add_generation_prompt=chat_generation_prompt(chat),
                    tools=tools,
                    continue_final_message=chat.continue_final_message,
                    template_kwargs=kwargs,
                )
            )
        elif which == "text":
            encoding = await self._run(
                lambda: self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
            )
        else:
            raise InvalidArgument("the request has neither text nor chat", field="input")
        token_strs = []
        if request.return_token_strs:
            token_strs = await self._run(lambda: self.tokenizer.token_strs(encoding.token_ids))
        return pb.EncodeResponse(
            token_ids=encoding.token_ids, rendered_text=encoding.rendered_text, token_strs=token_strs
        )

    @grpc_errors
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        text = await self._run(
            lambda: self.tokenizer.decode(request.token_ids, skip_special_tokens=request.skip_special_tokens)
        )
        return pb.DecodeResponse(text=text)

    @grpc_errors
    async def Detokenize(
        self, request_iterator: AsyncIterator[pb.DetokenizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DetokenizeResponse]:
        """One response per request, one delta per item in item order.

        A key names a sequence from its first item (which may carry `prompt_token_ids`, and
        whose `skip_special_tokens` holds for the sequence) until an item with `finish`;
        the same key afterwards starts a new sequence. A bad item ends the stream with
        INVALID_ARGUMENT.
        """
        sequences: dict[str, IncrementalDetokenizer] = {}
        async for request in request_iterator:
            deltas = []
            for item in request.items:
                if not item.key:
                    raise InvalidArgument("items[].key is empty", field="items.key")
                detok = sequences.get(item.key)
                if detok is None:
                    detok = self.tokenizer.detokenizer(
                        item.prompt_token_ids, skip_special_tokens=item.skip_special_tokens
                    )
                    sequences[item.key] = detok
                elif item.prompt_token_ids:
                    raise InvalidArgument(
                        f"sequence {item.key!r}: prompt_token_ids are only taken on its first item",
                        field="items.prompt_token_ids",
                    )
                text = detok.add(item.token_ids)
                if item.finish:
                    text += detok.finish()
                    del sequences[item.key]
                deltas.append(pb.DetokenizeDelta(key=item.key, text=text))
            yield pb.DetokenizeResponse(deltas=deltas)

    @grpc_errors
    async def Info(
        self, request: pb.TokenizerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizerInfoResponse:
        tok = self.tokenizer
        return pb.TokenizerInfoResponse(
            model=served_model_name(tok.model),
            vocab_size=tok.vocab_size,
            eos_token_ids=tok.eos_token_ids,
            bos_token_id=-1 if tok.bos_token_id is None else tok.bos_token_id,
            has_chat_template=tok.has_chat_template,
            max_input_bytes=tok.max_input_bytes,
            chat_template_supports_tools=tok.chat_template_supports_tools,
        )


def _tools(tools_json: str) -> list[dict] | None:
    """`ChatMessages.tools_json`: OpenAI's `tools` list as JSON text, or empty for none."""
    if not tools_json:
        return None
    tools = load_json_text(tools_json, "chat.tools_json")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidArgument("chat.tools_json must be a JSON list of objects", field="chat.tools_json")
    return tools
