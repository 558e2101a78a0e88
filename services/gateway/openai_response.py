"""OpenAI-compatible responses: whole bodies, stream chunks, usage and errors (logprobs: `openai_logprobs`)."""

from __future__ import annotations

from pagedserve.common.errors import PagedServeError
from pagedserve.gateway.datatypes import (
    ChoiceDelta,
    CompletedRequest,
    FinishReason,
    PromptLogprobs,
    RequestOutput,
    Usage,
)
from pagedserve.gateway.openai_logprobs import (
    chat_logprobs_json,
    completion_logprobs_json,
    prompt_logprobs_json,
)
from pagedserve.gateway.openai_request import ApiCall
from pagedserve.gateway.reasoning import ReasoningStream, split_reasoning
from pagedserve.gateway.tool_calls import ToolChoice, extract_tool_calls


def chat_message(
    tool_choice: ToolChoice | None, text: str, finish: FinishReason, reasoning_parser: str | None = None
) -> tuple[dict, str | None]:
    """The assistant message of a finished chat choice and its finish_reason: with a reasoning
    parser, the thinking goes to `reasoning` (see `reasoning`); tool calls found in the answer
    (see `tool_calls`) fill `tool_calls`, and the reason is then "tool_calls"."""
    message: dict = {"role": "assistant"}
    content: str | None = text
    if reasoning_parser:
        message["reasoning"], content = split_reasoning(reasoning_parser, text)
    tools_on = tool_choice is not None and tool_choice.mode != "none"
    if tools_on and content and finish is not FinishReason.ABORT:
        answer, calls = extract_tool_calls(tool_choice, content)
        if calls:
            message.update(content=answer, tool_calls=[c.to_json() for c in calls])
            return message, "tool_calls" if finish is FinishReason.STOP else finish.openai_name
    message["content"] = content
    return message, finish.openai_name


def error_body(err: PagedServeError) -> tuple[int, dict]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} and its HTTP status."""
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        408: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }.get(err.http_status, "internal_error")
    code = {
        401: "invalid_api_key",
        404: "model_not_found" if err.field == "model" else "not_found",
        408: "request_timeout",
        413: "request_too_large",
        415: "unsupported_media_type",
    }.get(err.http_status, err.code.lower())
    return err.http_status, {
        "error": {"message": err.message, "type": kind, "param": err.field, "code": code}
    }


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def full_response(
    call: ApiCall,
    result: CompletedRequest,
    response_id: str,
    created: int,
    model: str,
    echo_texts: list[str] | None = None,
) -> dict:
    """The non-streaming body of either endpoint; `echo_texts`: each prompt's text, for echo."""
    choices = []
    want_logprobs = call.request.sampling.logprobs is not None
    n = call.request.sampling.n
    prompts = result.prompt_logprobs_by_prompt
    for c in result.choices:
        choice: dict = {"index": c.index, "finish_reason": c.finish_reason.openai_name}
        if call.chat:
            choice["message"], choice["finish_reason"] = chat_message(
                call.tool_choice, c.text, c.finish_reason, call.reasoning
            )
            choice["logprobs"] = chat_logprobs_json(c.logprobs, call.tokens_as_ids) if want_logprobs else None
        else:
            choice["text"] = (echo_texts[c.index // n] if echo_texts else "") + c.text
            choice["logprobs"] = (
                completion_logprobs_json(
                    c.logprobs,
                    0,
                    prompts.get(c.index // n) if call.echo_logprobs else None,
                    call.request.sampling.logprobs or 0,
                    call.tokens_as_ids,
                )
                if want_logprobs
                else None
            )
            if call.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(
                    prompts.get(c.index // n), call.prompt_logprobs
                )
        if call.return_token_ids:
            choice["token_ids"] = c.token_ids
            prompt_index = c.index // call.request.sampling.n
            choice["prompt_token_ids"] = result.prompt_token_ids_by_prompt.get(prompt_index, [])
        if c.beam_score is not None:  # beam search: each beam's scores (vLLM's and transformers')
            choice["cumulative_logprob"] = c.cumulative_logprob
            choice["beam_score"] = c.beam_score
        choices.append(choice)
    body = {
        "id": response_id,
        "object": "chat.completion" if call.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(result.usage),
    }
    if call.chat and call.prompt_logprobs is not None:  # vLLM puts the chat form on the response
        body["prompt_logprobs"] = prompt_logprobs_json(prompts.get(0), call.prompt_logprobs)
    return body


class ChunkFormatter:
    """Turns a request's outputs into OpenAI stream chunks (dicts; `sse.sse_event` writes them)."""

    def __init__(
        self,
        call: ApiCall,
        response_id: str,
        created: int,
        model: str,
        echo_texts: list[str] | None = None,
    ) -> None:
        self.call = call
        self.response_id = response_id
        self.created = created
        self.model = model
        # echo: prompt i's text goes first in the first chunk of each of its choices
        self.echo_pending = (
            {i: echo_texts[i // call.request.sampling.n] for i in range(call.num_choices)}
            if echo_texts
            else {}
        )
        # completions logprobs: where each choice's next token starts
        self.text_offsets = [0] * call.num_choices
        self.want_logprobs = call.request.sampling.logprobs is not None
        # echo with logprobs: each prompt's logprobs (they come with its request's first output),
        # and the choices whose first chunk has not carried them yet
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}
        self.echo_logprobs_pending = set(range(call.num_choices)) if call.echo_logprobs else set()
        # Chat with tools: each choice's text is held until it finishes, since whether it is a
        # tool call (and where the call starts and ends) is known only then.
        tools = call.tool_choice
        self.held_text: dict[int, str] | None = {} if tools is not None and tools.mode != "none" else None
        # --reasoning-parser: each chat choice's text split into reasoning and content as it comes
        self.reasoning: dict[int, ReasoningStream] | None = {} if call.chat and call.reasoning else None
        # continuous_usage_stats: the tokens seen so far, and the prompts whose tokens are counted
        self.running = Usage()
        self.prompts_counted: set[int] = set()

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.call.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.call.include_usage:
            chunk["usage"] = self._running_usage() if self.call.continuous_usage else None
        return chunk

    def count_prompt(self, output: RequestOutput) -> None:
        """Running usage (continuous_usage_stats): each prompt's tokens come with its first output."""
        if output.prompt_token_ids is not None and output.prompt_index not in self.prompts_counted:
            self.prompts_counted.add(output.prompt_index)
            self.running.prompt_tokens += len(output.prompt_token_ids)

    def count(self, output: RequestOutput) -> None:
        """Add one output's tokens to the running usage; once per output, before its chunks."""
        self.count_prompt(output)
        self.running.completion_tokens += sum(len(d.token_ids) for d in output.choices)

    def _running_usage(self) -> dict:
        usage = self.running
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        }

    def start(self) -> list[dict]:
        """Chat streams open with the assistant role for every choice."""
        if not self.call.chat:
            return []
        n = self.call.request.sampling.n
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ]
            )
        ]

    def deltas(
        self,
        deltas: list[ChoiceDelta],
        prompt_token_ids: list[int] | None = None,
        prompt_logprobs: PromptLogprobs | None = None,
    ) -> list[dict]:
        n = self.call.request.sampling.n
        if prompt_logprobs is not None and deltas:
            self.prompt_logprobs[deltas[0].index // n] = prompt_logprobs
        choices = []
        for d in deltas:
            if self.held_text is not None:
                choice = self._held_delta(d)
                if choice is not None:
                    choices.append(choice)
                continue
            if d.index in self.echo_pending:
                d.text = self.echo_pending.pop(d.index) + d.text
            if (
                not d.text
                and d.finish_reason is FinishReason.NONE
                and not d.logprobs
                and not self.call.return_token_ids
            ):
                continue  # nothing a client could see yet (e.g. held-back text)
            choice: dict = {"index": d.index}
            if self.call.chat:
                if self.reasoning is not None:
                    choice["delta"] = self._reasoning_delta(d)
                else:
                    choice["delta"] = (
                        {"content": d.text} if d.text or d.finish_reason is FinishReason.NONE else {}
                    )
                choice["logprobs"] = (
                    chat_logprobs_json(d.logprobs, self.call.tokens_as_ids) if self.want_logprobs else None
                )
            else:
                choice["text"] = d.text
                if self.want_logprobs:
                    prompt = None
                    if d.index in self.echo_logprobs_pending:
                        self.echo_logprobs_pending.discard(d.index)
                        prompt = self.prompt_logprobs.get(d.index // n)
                    logprobs = completion_logprobs_json(
                        d.logprobs,
                        self.text_offsets[d.index],
                        prompt,
                        self.call.request.sampling.logprobs or 0,
                        self.call.tokens_as_ids,
                    )
                    choice["logprobs"] = logprobs
                    self.text_offsets[d.index] += sum(len(t) for t in logprobs["tokens"])
                else:
                    choice["logprobs"] = None
            choice["finish_reason"] = d.finish_reason.openai_name
            if self.call.return_token_ids:
                choice["token_ids"] = d.token_ids
                if prompt_token_ids is not None:
                    choice["prompt_token_ids"] = prompt_token_ids
            choices.append(choice)
        return [self._chunk(choices)] if choices else []

    def _reasoning_delta(self, d: ChoiceDelta) -> dict:
        assert self.reasoning is not None and self.call.reasoning
        stream = self.reasoning.setdefault(d.index, ReasoningStream(self.call.reasoning))
        reasoning, content = stream.feed(d.text, final=d.finish_reason is not FinishReason.NONE)
        delta = {"reasoning": reasoning} if reasoning else {}
        if content or (not reasoning and d.finish_reason is FinishReason.NONE):
            delta["content"] = content
        return delta

    def _held_delta(self, d: ChoiceDelta) -> dict | None:
        """Tool mode: hold the text; at the finish, one delta with the content or the tool calls."""
        assert self.held_text is not None
        text = self.held_text.get(d.index, "") + d.text
        if d.finish_reason is FinishReason.NONE:
            self.held_text[d.index] = text
            return None
        self.held_text.pop(d.index, None)
        message, finish = chat_message(self.call.tool_choice, text, d.finish_reason, self.call.reasoning)
        delta: dict = {"reasoning": message["reasoning"]} if message.get("reasoning") else {}
        if message["content"]:
            delta["content"] = message["content"]
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        return {"index": d.index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def usage(self, usage: Usage) -> list[dict]:
        """The final usage-only chunk, when stream_options.include_usage asked for it."""
        if not self.call.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage)
        return [chunk]
