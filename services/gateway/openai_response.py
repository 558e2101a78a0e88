"""OpenAI-compatible responses: whole bodies, stream chunks, usage, logprobs and errors."""

from __future__ import annotations

from pagedserve.common.errors import PagedServeError
from pagedserve.gateway.datatypes import ChoiceDelta, CompletedRequest, FinishReason, TokenLogprob, Usage
from pagedserve.gateway.openai_request import ApiCall


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


def _token_bytes(token: str | None) -> list[int]:
    return list((token or "").encode())


def chat_logprobs_json(logprobs: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": lp.token or "",
                "logprob": lp.logprob,
                "bytes": _token_bytes(lp.token),
                "top_logprobs": [
                    {"token": t.token or "", "logprob": t.logprob, "bytes": _token_bytes(t.token)}
                    for t in lp.top
                ],
            }
            for lp in logprobs
        ]
    }


def completion_logprobs_json(logprobs: list[TokenLogprob], text_offset: int) -> dict:
    """The legacy completions form; `text_offset` is where the first token's text starts."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token or "")
    return {
        "tokens": [lp.token or "" for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token or "": t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
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
    for c in result.choices:
        choice: dict = {"index": c.index, "finish_reason": c.finish_reason.openai_name}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            choice["logprobs"] = chat_logprobs_json(c.logprobs) if want_logprobs else None
        else:
            choice["text"] = (echo_texts[c.index // n] if echo_texts else "") + c.text
            choice["logprobs"] = completion_logprobs_json(c.logprobs, 0) if want_logprobs else None
        if call.return_token_ids:
            choice["token_ids"] = c.token_ids
            prompt_index = c.index // call.request.sampling.n
            choice["prompt_token_ids"] = result.prompt_token_ids_by_prompt.get(prompt_index, [])
        if c.beam_score is not None:  # beam search: each beam's scores (vLLM's and transformers')
            choice["cumulative_logprob"] = c.cumulative_logprob
            choice["beam_score"] = c.beam_score
        choices.append(choice)
    return {
        "id": response_id,
        "object": "chat.completion" if call.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(result.usage),
    }


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

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.call.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.call.include_usage:
            chunk["usage"] = None
        return chunk

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

    def deltas(self, deltas: list[ChoiceDelta], prompt_token_ids: list[int] | None = None) -> list[dict]:
        choices = []
        for d in deltas:
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
                choice["delta"] = (
                    {"content": d.text} if d.text or d.finish_reason is FinishReason.NONE else {}
                )
                choice["logprobs"] = chat_logprobs_json(d.logprobs) if self.want_logprobs else None
            else:
                choice["text"] = d.text
                if self.want_logprobs:
                    choice["logprobs"] = completion_logprobs_json(d.logprobs, self.text_offsets[d.index])
                    self.text_offsets[d.index] += sum(len(lp.token or "") for lp in d.logprobs)
                else:
                    choice["logprobs"] = None
            choice["finish_reason"] = d.finish_reason.openai_name
            if self.call.return_token_ids:
                choice["token_ids"] = d.token_ids
                if prompt_token_ids is not None:
                    choice["prompt_token_ids"] = prompt_token_ids
            choices.append(choice)
        return [self._chunk(choices)] if choices else []

    def usage(self, usage: Usage) -> list[dict]:
        """The final usage-only chunk, when stream_options.include_usage asked for it."""
        if not self.call.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage)
        return [chunk]
