"""In-process stand-ins for the gateway's tokenizer and scheduler, and small helpers, for the
gateway tests. They keep to the services' contracts (one Submit stream per request with all of a
step's tokens per message; a Detokenize stream that answers items in order); token ids are code
points, BOS 1 and EOS 0."""

from __future__ import annotations

import asyncio

from pagedserve.common.params import SamplingParams
from pagedserve.common.stats import SchedulerStats
from pagedserve.gateway.config import GatewayConfig
from pagedserve.gateway.datatypes import (
    ChoiceTokens,
    CompletedRequest,
    FinishReason,
    GenerationRequest,
    Prompt,
    PromptKind,
    SchedulerUpdate,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from pagedserve.gateway.engine import Engine

EOS = 0
BOS = 1
MAX_MODEL_LEN = 64


class FakeDetokenizer:
    """Characters are their code points; records every batch."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.released: list[str] = []

    def begin(self) -> int:
        return 1

    async def detokenize(self, items, generation: int) -> list[str]:
        self.batches.append(items)
        await asyncio.sleep(0)
        return ["".join(chr(t) for t in item.token_ids if t not in (EOS, BOS)) for item in items]

    def release(self, keys: list[str], generation: int) -> None:
        self.released.extend(keys)


class FakeTokenizer:
    def __init__(self) -> None:
        self.detokenizer = FakeDetokenizer()
        self.encoded: list[Prompt] = []
        self.gate: asyncio.Event | None = None  # when set to an Event, encode waits for it

    def check_connected(self) -> None:
        pass

    async def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            vocab_size=300, eos_token_ids=(EOS,), has_chat_template=True, max_input_bytes=1000
        )

    async def encode(self, prompt: Prompt) -> list[int]:
        self.encoded.append(prompt)
        if self.gate is not None:
            await self.gate.wait()
        text = prompt.text if prompt.kind is PromptKind.TEXT else "".join(m.content for m in prompt.messages)
        specials = [] if prompt.kind is PromptKind.TEXT and not prompt.add_special_tokens else [BOS]
        return specials + [ord(c) for c in text]

    async def encode_with_strs(self, prompt: Prompt) -> tuple[list[int], list[str]]:
        token_ids = await self.encode(prompt)
        return token_ids, ["<s>" if t == BOS else chr(t) for t in token_ids]


class FakeStream:
    """Waits at `gate` after the first update; ends (as the scheduler's does) once aborted."""

    def __init__(
        self, updates: list[SchedulerUpdate], gate: asyncio.Event | None, break_after: int = -1
    ) -> None:
        self.updates = updates
        self.gate = gate
        self.cancelled = False
        self.aborted = asyncio.Event()
        self.break_after = break_after  # the scheduler dies after this many messages (-1: never)

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        from pagedserve.common.errors import Unavailable

        for i, update in enumerate(self.updates):
            if i == self.break_after:
                raise Unavailable("scheduler at test is unavailable: connection reset")
            if i > 0 and self.gate is not None:
                waits = [asyncio.ensure_future(self.gate.wait()), asyncio.ensure_future(self.aborted.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()
            if self.aborted.is_set():
                return
            yield update


class FakeScheduler:
    """Each choice `i` produces the characters of `outputs[i]`, one per step, then LENGTH (or EOS)."""

    def __init__(self, outputs: list[str], gate: asyncio.Event | None = None, end_with_eos: bool = False):
        self.outputs = outputs
        self.gate = gate
        self.end_with_eos = end_with_eos
        self.submitted: list[tuple[str, list[int], SamplingParams]] = []
        self.progress: list[list[tuple[int, list[int], bool]] | None] = []  # per submit: what a re-attach had
        self.aborted: list[str] = []
        self.streams: list[FakeStream] = []
        self.break_after = -1  # the next stream breaks after this many messages

    def submit(self, request_id, prompt_ids, sampling, priority, progress=None) -> FakeStream:
        self.submitted.append((request_id, prompt_ids, sampling))
        self.progress.append(
            [(i, list(ids), done) for i, ids, done in progress] if progress is not None else None
        )
        want_lp = sampling.logprobs is not None
        texts = [self.outputs[i % len(self.outputs)][: sampling.max_tokens] for i in range(sampling.n)]
        updates = []
        for step in range(max(len(t) for t in texts)):
            choices = []
            for i, text in enumerate(texts):
                if step >= len(text):
                    continue
                last = step == len(text) - 1
                token = EOS if last and self.end_with_eos else ord(text[step])
                reason = FinishReason.NONE
                if last:
                    reason = FinishReason.STOP if self.end_with_eos else FinishReason.LENGTH
                lps = [TokenLogprob(token, -0.25, [TopLogprob(token, -0.25)])] if want_lp else []
                choices.append(ChoiceTokens(i, [token], lps, reason))
            done = all(step >= len(t) - 1 for t in texts)
            updates.append(
                SchedulerUpdate(
                    choices=choices,
                    usage=Usage(len(prompt_ids), sum(map(len, texts)), 0) if done else None,
                    cached_prompt_tokens=3 if step == 0 else 0,
                )
            )
        if progress is not None:  # a re-attach: only what the client has not seen
            held = {i: len(ids) for i, ids, _ in progress}
            updates = [
                SchedulerUpdate(
                    choices=[c for c in u.choices if step >= held.get(c.index, 0)],
                    usage=u.usage,
                    cached_prompt_tokens=u.cached_prompt_tokens,
                )
                for step, u in enumerate(updates)
            ]
            updates = [u for u in updates if u.choices or u.usage is not None]
        stream = FakeStream(updates, self.gate, self.break_after)
        self.break_after = -1
        self.streams.append(stream)
        return stream

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        for (submitted_id, _, _), stream in zip(self.submitted, self.streams, strict=True):
            if submitted_id == request_id:
                stream.aborted.set()
        return True

    async def stats(self, timeout=None) -> SchedulerStats:
        return SchedulerStats(max_model_len=MAX_MODEL_LEN)


def make_engine(scheduler: FakeScheduler, **config) -> tuple[Engine, FakeTokenizer]:
    tokenizer = FakeTokenizer()
    cfg = GatewayConfig(model="/models/tiny-py", served_model_names=("tiny-py",), **config)
    return Engine(cfg, tokenizer, scheduler), tokenizer


def text_request(text: str, stop: list[str] | None = None, **sampling) -> GenerationRequest:
    return GenerationRequest(
        prompt=Prompt(PromptKind.TEXT, text=text), sampling=SamplingParams(**sampling), stop=stop or []
    )


async def collect(engine: Engine, request: GenerationRequest) -> CompletedRequest:
    result = CompletedRequest.start("", request.sampling.n)
    async for output in engine.generate(request):
        result.request_id = output.request_id
        result.add(output)
    await asyncio.sleep(0.01)  # let background aborts run
    return result
