"""`POST /tokenize` and `POST /detokenize`: the served model's tokenizer over HTTP, in vLLM's shapes.

    POST /tokenize    {"prompt": "def f():"}  or  {"messages": [...], "add_generation_prompt": true}
                      -> {"count": 4, "max_model_len": 512, "tokens": [...], "token_strs": null}
                      ("return_token_strs": true: "token_strs" holds each id's vocabulary entry)
    POST /detokenize  {"tokens": [1, 822, 285]}  -> {"prompt": "<s> def f"}

`/tokenize` counts a prompt as a completion or chat request would be tokenized (the chat
template applied, `add_special_tokens` true by default for text), with the same checks and
limits; a client can size a request against `max_model_len` before sending it. `/detokenize`
keeps special tokens unless `skip_special_tokens` is true, and takes at most max_model_len ids.
Both take an optional `model` (a served name). With `--api-key`, both need it, as /v1 does.
"""

from __future__ import annotations

from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.body_fields import (
    MISSING,
    check_text,
    get_field,
    is_int_list,
    read_bool,
    read_model,
    reject,
)
from pagedserve.gateway.chat_messages import read_chat_prompt
from pagedserve.gateway.datatypes import Prompt, PromptKind
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.tool_calls import parse_tools


def _prompt(body: dict) -> Prompt:
    has_prompt, has_messages = (
        get_field(body, "prompt") is not MISSING,
        get_field(body, "messages") is not MISSING,
    )
    if has_prompt == has_messages:
        raise InvalidArgument("give exactly one of prompt (a string) or messages (a chat)", field="prompt")
    if has_prompt:
        text = body["prompt"]
        if not isinstance(text, str):
            raise InvalidArgument("prompt must be a string", field="prompt")
        for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
            reject(body, name, lambda _: False, "it goes with messages")
        return Prompt(
            PromptKind.TEXT,
            text=check_text(text, "prompt", "prompt"),
            add_special_tokens=read_bool(body, "add_special_tokens", True),
        )
    # the chat template places the special tokens itself
    reject(body, "add_special_tokens", lambda v: v is False, "a chat is tokenized as its template renders it")
    tools_json, _, _ = parse_tools(body)
    return read_chat_prompt(body, tools_json)


async def tokenize(engine: Engine, body: dict) -> dict:
    engine.check_model(read_model(body))
    return_token_strs = read_bool(body, "return_token_strs", False)
    prompt = _prompt(body)
    token_ids, token_strs = await engine.tokenize(prompt, return_token_strs=return_token_strs)
    return {
        "count": len(token_ids),
        "max_model_len": await engine.last_max_model_len(),  # 0: not known yet
        "tokens": token_ids,
        "token_strs": token_strs,
    }


async def detokenize(engine: Engine, body: dict) -> dict:
    engine.check_model(read_model(body))
    tokens = get_field(body, "tokens")
    if tokens is MISSING or not is_int_list(tokens):
        raise InvalidArgument("tokens must be a list of integer token ids", field="tokens")
    skip = read_bool(body, "skip_special_tokens", False)
    return {"prompt": await engine.detokenize(tokens, skip_special_tokens=skip, field="tokens")}
