"""What a request's stream carries, and the per-request buffer between the step loop and the client.

The step loop never waits for a client: it merges each step's tokens into the request's
`RequestStream`, and the client side takes whatever has piled up since its last message.
A slow client therefore gets fewer, bigger messages; it never stalls the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.common.outputs import ChoiceTokens, FinishReason, Usage
from pagedserve.common.step import TokenLogprobs


@dataclass(slots=True)
class RequestDelta:
    """Everything new for one request since its last message."""

    request_id: str
    choices: list[ChoiceTokens]
    usage: Usage | None = None  # set on the last message
    cached_prompt_tokens: int | None = None  # set on the first message with tokens
    # entry i: prompt token i + 1's; once, on the first message after all were computed
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.usage is not None


class RequestStream:
    """The merge buffer of one request: `push_*` from the step loop, `get` from the client side."""

    __slots__ = (
        "request_id",
        "_choices",
        "_usage",
        "_cached",
        "_cached_sent",
        "_prompt_logprobs",
        "_event",
        "_done",
        "_error",
        "_listener",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._choices: dict[int, ChoiceTokens] = {}
        self._usage: Usage | None = None
        self._cached: int | None = None
        self._cached_sent = False
        self._prompt_logprobs: list[TokenLogprobs] | None = None
        self._event = asyncio.Event()
        self._done = False  # the final delta was taken
        self._error: Exception | None = None  # the request failed: raised once the pending tokens are taken
        # Told (synchronously) whenever something becomes pending: a shared Connect stream
        # collects its ready requests this way instead of waiting on each one's event.
        self._listener: Callable[[RequestStream], None] | None = None

    def listen(self, listener: Callable[[RequestStream], None]) -> None:
        """Call `listener(self)` whenever something new is pending (and now, if it already is)."""
        self._listener = listener
        if self._event.is_set() or self._error is not None:
            listener(self)

    def _notify(self) -> None:
        self._event.set()
        if self._listener is not None:
            self._listener(self)

    def push(
        self,
        index: int,
        token_ids: list[int],
        logprobs: list[TokenLogprobs] | None = None,
        finish_reason: FinishReason = FinishReason.NONE,
        stop_token_id: int = -1,
    ) -> None:
        if self._error is not None:
            return
        delta = self._choices.get(index)
        if delta is None:
            delta = self._choices[index] = ChoiceTokens(index)
        delta.token_ids.extend(token_ids)
        if logprobs:
            delta.logprobs.extend(logprobs)
        if finish_reason != FinishReason.NONE:
            delta.finish_reason, delta.stop_token_id = finish_reason, stop_token_id
        self._notify()

    def push_beam(
        self,
        index: int,
        token_ids: list[int],
        finish_reason: FinishReason,
        stop_token_id: int,
        cumulative_logprob: float,
        beam_score: float,
    ) -> None:
        """A beam-search choice, whole, with its scores (it ends with this message)."""
        self.push(index, token_ids, None, finish_reason, stop_token_id)
        delta = self._choices.get(index)
        if delta is not None:
            delta.cumulative_logprob, delta.beam_score = cumulative_logprob, beam_score

    def set_cached_prompt_tokens(self, num_tokens: int) -> None:
        if self._cached is None and not self._cached_sent:
            self._cached = num_tokens

    def set_prompt_logprobs(self, logprobs: list[TokenLogprobs]) -> None:
        """They go out with the next message (the one with the first token, in practice)."""
        self._prompt_logprobs = logprobs

    def finish(self, usage: Usage) -> None:
        if self._error is None:
            self._usage = usage
        self._notify()

    def fail(self, error: Exception) -> None:
        """End the stream with `error` (after the tokens already pushed); later pushes are dropped."""
        if self._usage is None and self._error is None:
            self._error = error
            self._notify()

    @property
    def finished(self) -> bool:
        return self._usage is not None

    def take(self) -> RequestDelta | None:
        """Everything pending, or None when nothing is."""
        if self._done or (not self._choices and self._usage is None):
            return None
        choices = [self._choices[i] for i in sorted(self._choices)]
        self._choices = {}
        cached = None
        if self._cached is not None and any(c.token_ids for c in choices):
            cached, self._cached, self._cached_sent = self._cached, None, True
        prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
        if self._usage is not None:
            self._done = True
        self._event.clear()
        return RequestDelta(self.request_id, choices, self._usage, cached, prompt_logprobs)

    def poll(self) -> RequestDelta | Exception | None:
        """Without waiting: everything pending, else the request's error (once), else None.
        Call again after a delta: an error may follow the tokens pushed before it."""
        delta = self.take()
        if delta is not None:
            return delta
        if self._error is not None and not self._done:
            self._done = True
            return self._error
        return None

    async def get(self) -> RequestDelta:
        """Wait for the next delta (the last one has `finished`); never call again after it."""
        while True:
            delta = self.take()
            if delta is not None:
                return delta
            if self._error is not None:
                self._done = True
                raise self._error
            if self._done:
                raise RuntimeError(f"request {self.request_id}: stream already finished")
            await self._event.wait()
