"""One request's run between Submit and its last output: steps 4-8 of `engine.py`'s list.

Each scheduler message holds a step's new tokens for every choice; they are detokenized in
one batch on the shared Detokenize stream, passed through each choice's `StopMatcher`, and
yielded as `ChoiceDelta`s. A run that ends before the scheduler finished every choice (client
gone, stop string, error, timeout) aborts the request in the scheduler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.common.errors import PagedServeError, Unavailable
from pagedserve.common.params import SamplingParams
from pagedserve.gateway.datatypes import (
    ChoiceDelta,
    DetokenizeItem,
    FinishReason,
    GenerationRequest,
    PromptLogprobs,
    RequestOutput,
    SchedulerUpdate,
    TokenLogprob,
    Usage,
)
from pagedserve.gateway.stop import StopMatcher

if TYPE_CHECKING:
    from pagedserve.gateway.engine import Engine

# Prompt ids sent to seed a choice's detokenizer: it decodes only the last few (5 kept ids) as
# context, and special tokens at the end of a chat prompt are skipped before counting.
_DETOKENIZE_CONTEXT = 32


class RequestTimeout(PagedServeError):
    """The request ran past the gateway's --request-timeout."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


@dataclass(slots=True)
class _Choice:
    index: int
    key: str  # the sequence's key on the Detokenize stream
    matcher: StopMatcher
    started: bool = False  # the Detokenize stream has seen this key
    finished: bool = False  # its last delta was produced
    released: bool = False  # the Detokenize stream was told to forget it (finish=True sent)
    num_tokens: int = 0  # tokens returned to the client
    finished_in_scheduler: bool = False  # the scheduler sent its finish reason (its blocks are freed)
    token_ids: list[int] = field(default_factory=list)  # every id received, for a re-attach


class RequestRun:
    """One request's state between Submit and its last output."""

    def __init__(
        self,
        engine: Engine,
        request: GenerationRequest,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        vocab_size: int,
    ) -> None:
        self.engine = engine
        self.request = request
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.choices = [
            _Choice(
                index=i,
                key=f"{request_id}/{i}",
                matcher=StopMatcher(request.stop, request.include_stop_str_in_output),
            )
            for i in range(sampling.n)
        ]
        self.cached_prompt_tokens = 0
        self.detokenizer = engine.tokenizer.detokenizer
        self.generation = 0
        self.num_lookups = 0  # keys used for token-string lookups on the Detokenize stream
        self.vocab_size = vocab_size

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        started = time.monotonic()
        deadline = started + engine.config.request_timeout if engine.config.request_timeout else None
        last_time: float | None = None
        self.generation = self.detokenizer.begin()
        stream = engine.scheduler.submit(
            self.request_id, self.prompt_ids, self.sampling, self.request.priority
        )
        updates = aiter(stream)
        done_in_scheduler = False
        first = True
        prompt_logprobs: list[TokenLogprob] = []  # entry i: prompt token i + 1 (see _prompt_logprobs)
        # While the scheduler is away, re-attach until no progress was made for --stall-timeout
        # (trying for at least a second after the failure).
        last_progress = started
        down_since: float | None = None
        try:
            while not all(c.finished for c in self.choices):
                try:
                    update = await self._next(updates, deadline, quick=down_since is not None)
                except StopAsyncIteration:
                    break
                except Unavailable as err:
                    now = time.monotonic()
                    down_since = down_since or now
                    if now - last_progress >= engine.config.stall_timeout and now - down_since >= min(
                        1.0, engine.config.stall_timeout
                    ):
                        raise Unavailable(
                            f"{err.message} (no progress for {now - last_progress:.0f} s, --stall-timeout)"
                        ) from None
                    stream.cancel()
                    stream = await self._reattach(now - down_since)
                    updates = aiter(stream)
                    continue
                down_since = None
                last_progress = time.monotonic()
                if update.cached_prompt_tokens:
                    self.cached_prompt_tokens = update.cached_prompt_tokens
                if update.usage is not None:
                    self.cached_prompt_tokens = update.usage.cached_prompt_tokens or self.cached_prompt_tokens
                    done_in_scheduler = True
                prompt_logprobs.extend(update.prompt_logprobs)
                for ct in update.choices:
                    self.choices[ct.index].token_ids.extend(ct.token_ids)
                    if ct.finish_reason is not FinishReason.NONE:
                        self.choices[ct.index].finished_in_scheduler = True
                done_in_scheduler = done_in_scheduler or all(c.finished_in_scheduler for c in self.choices)
                deltas = await self._deltas(update)
                now = time.monotonic()
                if engine.metrics is not None and any(d.token_ids for d in deltas):
                    if last_time is None:
                        engine.metrics.observe_first_token(now - started)
                    else:
                        per_choice = max(len(d.token_ids) for d in deltas)
                        engine.metrics.observe_token_interval((now - last_time) / per_choice)
                    last_time = now
                if deltas:
                    finished = all(c.finished for c in self.choices)
                    yield RequestOutput(
                        request_id=self.request_id,
                        choices=deltas,
                        usage=self._usage() if finished else None,
                        prompt_token_ids=self.prompt_ids if first else None,
                        prompt_logprobs=await self._prompt_logprobs(prompt_logprobs) if first else None,
                    )
                    first = False
            if not all(c.finished for c in self.choices):
                # The scheduler ended the stream without finishing every choice: report them aborted.
                deltas = await self._finish_rest(FinishReason.ABORT)
                yield RequestOutput(
                    request_id=self.request_id,
                    choices=deltas,
                    usage=self._usage(),
                    prompt_token_ids=self.prompt_ids if first else None,
                )
        finally:
            stream.cancel()
            if (finished := getattr(engine.scheduler, "finished", None)) is not None:
                finished(self.request_id, self.cached_prompt_tokens)
            self.detokenizer.release(
                [c.key for c in self.choices if c.started and not c.released], self.generation
            )
            if not done_in_scheduler:
                engine.spawn(engine.abort_quietly(self.request_id))

    async def _reattach(self, down_for: float):
        """A new Submit that re-attaches this request (after a short backoff) to the scheduler
        now serving the pool — the same one restarted, or a standby — with every token this
        gateway already has, so the stream resumes with no gap and no repeat."""
        scheduler = self.engine.scheduler
        await asyncio.sleep(min(0.1 * 2 ** min(int(down_for), 4), 1.0) if down_for else 0.05)
        if len(getattr(scheduler, "addresses", ())) > 1 and not await scheduler.ready(timeout=1.0):
            scheduler.failover()
        progress = [(c.index, c.token_ids, c.finished or c.finished_in_scheduler) for c in self.choices]
        return scheduler.submit(
            self.request_id, self.prompt_ids, self.sampling, self.request.priority, progress
        )

    async def _next(
        self, updates: AsyncIterator[SchedulerUpdate], deadline: float | None, quick: bool = False
    ) -> SchedulerUpdate:
        """The next Submit message. While none comes, probe the scheduler every `stall_probe_interval`
        seconds: a wait in its queue is normal, a scheduler that stopped answering is Unavailable
        (`quick`: right after a re-attach, probe within a second). Past `deadline`
        (--request-timeout) the request fails with RequestTimeout."""
        config = self.engine.config
        interval = min(config.stall_probe_interval, 0.5) if quick else config.stall_probe_interval
        probe_timeout = min(config.connect_timeout, 1.0) if quick else None
        pending = asyncio.ensure_future(anext(updates))
        try:
            while True:
                wait = interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                done, _ = await asyncio.wait({pending}, timeout=max(wait, 0.0))
                if done:
                    return pending.result()
                if deadline is not None and time.monotonic() >= deadline:
                    raise RequestTimeout(
                        f"request {self.request_id} took longer than --request-timeout={config.request_timeout}s"
                    )
                await self.engine.scheduler.stats(
                    timeout=probe_timeout
                )  # Unavailable when the scheduler is gone
        finally:
            if not pending.done():
                pending.cancel()

    async def _deltas(self, update: SchedulerUpdate) -> list[ChoiceDelta]:
        """Detokenize one step's tokens for every live choice (one batch) and apply stop strings."""
        live = [(self.choices[ct.index], ct) for ct in update.choices if not self.choices[ct.index].finished]
        if not self.request.detokenize:  # token ids only: no text, no detokenizer state
            deltas = []
            for choice, ct in live:
                delta = ChoiceDelta(
                    index=choice.index,
                    token_ids=ct.token_ids,
                    logprobs=ct.logprobs,
                    cumulative_logprob=ct.cumulative_logprob,
                    beam_score=ct.beam_score,
                )
                if ct.finish_reason is not FinishReason.NONE:
                    delta.finish_reason = ct.finish_reason
                    choice.finished = True
                choice.num_tokens += len(ct.token_ids)
                deltas.append(delta)
            return deltas
        items = []
        # The token that stopped a choice (EOS or a stop token id) is in its token ids but not its
        # text, unless the request asked for it (vLLM's include_stop_str_in_output).
        drop_stop = not self.request.include_stop_str_in_output
        for choice, ct in live:
            finishing = ct.finish_reason is not FinishReason.NONE
            stop_token = drop_stop and ct.finish_reason is FinishReason.STOP and bool(ct.token_ids)
            items.append(
                DetokenizeItem(
                    key=choice.key,
                    token_ids=self._in_vocab(ct.token_ids[:-1] if stop_token else ct.token_ids),
                    prompt_token_ids=[] if choice.started else self.prompt_ids[-_DETOKENIZE_CONTEXT:],
                    finish=finishing,
                    skip_special_tokens=self.request.skip_special_tokens,
                )
            )
            choice.started = True
            choice.released = choice.released or finishing
        lookups = self._token_string_items([lp for _, ct in live for lp in ct.logprobs])
        if not items:
            return []
        texts = await self.detokenizer.detokenize(items + lookups, self.generation)
        token_strings = iter(texts[len(items) :])
        deltas = []
        for (choice, ct), text in zip(live, texts, strict=False):
            result = choice.matcher.feed(text)
            delta = ChoiceDelta(
                index=choice.index,
                text=result.text,
                token_ids=ct.token_ids,
                logprobs=ct.logprobs,
                cumulative_logprob=ct.cumulative_logprob,
                beam_score=ct.beam_score,
            )
            if lookups:
                _fill_token_strings(delta.logprobs, token_strings)
            if result.stopped:
                delta.finish_reason = FinishReason.STOP
                choice.finished = True
            elif ct.finish_reason is not FinishReason.NONE:
                delta.text += choice.matcher.flush()
                delta.finish_reason = ct.finish_reason
                choice.finished = True
            choice.num_tokens += len(ct.token_ids)
            deltas.append(delta)
        return deltas

    async def _prompt_logprobs(self, logprobs: list[TokenLogprob]) -> PromptLogprobs | None:
        """The prompt's logprobs for the first output, when the request asked (the scheduler sends
        them with the first token), with token strings looked up for HTTP."""
        if self.sampling.prompt_logprobs is None:
            return None
        result = PromptLogprobs(self.prompt_ids[0], logprobs=logprobs)
        first = TokenLogprob(self.prompt_ids[0], 0.0)  # only its string is wanted
        lookups = self._token_string_items([first, *logprobs])
        if lookups:
            strings = iter(await self.detokenizer.detokenize(lookups, self.generation))
            _fill_token_strings([first, *logprobs], strings)
            result.first_token = first.token
        return result

    def _in_vocab(self, token_ids: list[int]) -> list[int]:
        """Ids the tokenizer knows. A model's embedding table may be larger than its tokenizer,
        and one bad id would end the Detokenize stream that every request shares."""
        vocab_size = self.vocab_size
        if all(0 <= t < vocab_size for t in token_ids):
            return token_ids
        return [t for t in token_ids if 0 <= t < vocab_size]

    def _token_string_items(self, logprobs: list[TokenLogprob]) -> list[DetokenizeItem]:
        """One single-token sequence per id to show as text in logprobs (HTTP only)."""
        if not self.request.logprob_token_strings or not logprobs:
            return []
        items = []
        for lp in logprobs:
            for token_id in [lp.token_id, *(t.token_id for t in lp.top)]:
                self.num_lookups += 1
                items.append(
                    DetokenizeItem(
                        key=f"{self.request_id}/t{self.num_lookups}",
                        token_ids=self._in_vocab([token_id]),
                        finish=True,
                        skip_special_tokens=False,
                    )
                )
        return items

    async def _finish_rest(self, reason: FinishReason) -> list[ChoiceDelta]:
        deltas = []
        for choice in self.choices:
            if choice.finished:
                continue
            text = ""
            if choice.started and not choice.released:
                (text,) = await self.detokenizer.detokenize(
                    [DetokenizeItem(key=choice.key, token_ids=[], finish=True)], self.generation
                )
                choice.released = True
            result = choice.matcher.feed(text)
            text = result.text + choice.matcher.flush()
            choice.finished = True
            deltas.append(ChoiceDelta(index=choice.index, text=text, finish_reason=reason))
        return deltas

    def _usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=sum(c.num_tokens for c in self.choices),
            cached_prompt_tokens=self.cached_prompt_tokens,
        )


def _fill_token_strings(logprobs: list[TokenLogprob], strings) -> None:
    for lp in logprobs:
        lp.token = next(strings)
        for top in lp.top:
            top.token = next(strings)
