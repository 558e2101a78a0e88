"""The engine's request life against in-process stand-ins for the tokenizer and scheduler.

The stand-ins keep to the services' contracts (one Submit stream per request with all of a
step's tokens per message; a Detokenize stream that answers items in order), so these tests
pin what the gateway itself decides: validation before anything is submitted, stop strings,
aborts on every early end, usage, and batching of detokenization per step. The same paths
run against the real services in tests/e2e.
"""

from __future__ import annotations

import asyncio

import pytest
from gateway_fakes import (
    BOS,
    MAX_MODEL_LEN,
    FakeScheduler,
    collect,
    make_engine,
    text_request,
)

from pagedserve.common.errors import InvalidArgument, NotFound, ResourceExhausted
from pagedserve.common.params import SamplingParams
from pagedserve.common.stats import SchedulerStats
from pagedserve.gateway.datatypes import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    Prompt,
    PromptKind,
    Usage,
)
from pagedserve.gateway.engine import Engine


def test_runs_to_length_with_usage_and_no_abort() -> None:
    scheduler = FakeScheduler(["hello world"])
    engine, tokenizer = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("hi", max_tokens=5)))
    (choice,) = result.choices
    assert choice.text == "hello" and choice.finish_reason is FinishReason.LENGTH
    assert choice.token_ids == [ord(c) for c in "hello"]
    assert result.usage == Usage(prompt_tokens=3, completion_tokens=5, cached_prompt_tokens=3)
    assert result.prompt_token_ids == [BOS, ord("h"), ord("i")]
    assert scheduler.aborted == [] and scheduler.streams[0].cancelled
    first_item = tokenizer.detokenizer.batches[0][0]
    assert first_item.prompt_token_ids == [BOS, ord("h"), ord("i")] and not first_item.finish
    assert tokenizer.detokenizer.batches[-1][0].finish, "the last tokens flush the sequence"
    assert engine.num_in_flight == 0


def test_stop_string_across_tokens_cuts_text_and_aborts() -> None:
    scheduler = FakeScheduler(["abc<end>tail after"])
    engine, tokenizer = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("p", stop=["<end>"], max_tokens=30)))
    (choice,) = result.choices
    assert choice.text == "abc" and choice.finish_reason is FinishReason.STOP
    assert len(choice.token_ids) == len("abc<end>"), "tokens up to the one completing the stop string"
    assert result.usage.completion_tokens == len("abc<end>")
    assert scheduler.aborted == [result.request_id]
    assert tokenizer.detokenizer.released == [f"{result.request_id}/0"]


def test_eos_finishes_with_stop_and_no_abort() -> None:
    scheduler = FakeScheduler(["ab!"], end_with_eos=True)
    engine, _ = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("p", max_tokens=30)))
    assert result.choices[0].text == "ab" and result.choices[0].finish_reason is FinishReason.STOP
    assert scheduler.aborted == []


def test_n_choices_are_detokenized_in_one_batch_per_step() -> None:
    scheduler = FakeScheduler(["aaaa", "bbbb", "cccc", "dddd"])
    engine, tokenizer = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("p", n=4, max_tokens=4)))
    assert [c.text for c in result.choices] == ["aaaa", "bbbb", "cccc", "dddd"]
    assert result.usage.completion_tokens == 16
    assert len(tokenizer.detokenizer.batches) == 4
    assert all(len(batch) == 4 for batch in tokenizer.detokenizer.batches)
    assert {item.key for item in tokenizer.detokenizer.batches[0]} == {
        f"{result.request_id}/{i}" for i in range(4)
    }


def test_one_choice_stopped_early_others_continue() -> None:
    scheduler = FakeScheduler(["x.yz", "abcd"])
    engine, _ = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("p", stop=["."], n=2, max_tokens=4)))
    assert [(c.text, c.finish_reason) for c in result.choices] == [
        ("x", FinishReason.STOP),
        ("abcd", FinishReason.LENGTH),
    ]
    assert result.usage.completion_tokens == 2 + 4


def test_closing_the_stream_early_aborts_in_the_scheduler() -> None:
    async def scenario() -> tuple[FakeScheduler, Engine]:
        scheduler = FakeScheduler(["abcdefgh"], gate=asyncio.Event())
        engine, _ = make_engine(scheduler)
        outputs = engine.generate(text_request("p", max_tokens=8))
        first = await anext(outputs)
        assert first.choices[0].text == "a"
        assert engine.num_in_flight == 1
        await outputs.aclose()
        await asyncio.sleep(0.01)
        return scheduler, engine

    scheduler, engine = asyncio.run(scenario())
    assert len(scheduler.aborted) == 1 and scheduler.streams[0].cancelled
    assert engine.num_in_flight == 0


def test_queue_full_is_resource_exhausted_at_once() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["abcdefgh"], gate=asyncio.Event())
        engine, _ = make_engine(scheduler, max_queued_requests=2)
        running = [engine.generate(text_request("p", max_tokens=8)) for _ in range(2)]
        for outputs in running:
            await anext(outputs)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await anext(engine.generate(text_request("p", max_tokens=8)))
        assert len(scheduler.submitted) == 2
        scheduler.gate.set()
        for outputs in running:
            async for _ in outputs:
                pass
        assert engine.num_in_flight == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("request_", "error", "field", "words"),
    [
        (
            GenerationRequest(Prompt(PromptKind.TEXT, text="x"), SamplingParams(), model="gpt-9"),
            NotFound,
            "model",
            "gpt-9",
        ),
        (text_request(""), InvalidArgument, "prompt", "empty"),
        (GenerationRequest(Prompt(PromptKind.CHAT), SamplingParams()), InvalidArgument, "messages", "empty"),
        (text_request("x", temperature=-1.0), InvalidArgument, "temperature", ">= 0"),
        (text_request("x", top_p=1.5), InvalidArgument, "top_p", "(0, 1]"),
        (text_request("x", n=0), InvalidArgument, "n", ">= 1"),
        (text_request("x", max_tokens=0), InvalidArgument, "max_tokens", ">= 1"),
        (
            text_request("x", max_tokens=MAX_MODEL_LEN),
            InvalidArgument,
            "max_tokens",
            f"max_model_len={MAX_MODEL_LEN}",
        ),
        (text_request("x", stop_token_ids=[300]), InvalidArgument, "stop_token_ids", "300"),
        (
            GenerationRequest(Prompt(PromptKind.TOKEN_IDS, token_ids=[1, 999]), SamplingParams()),
            InvalidArgument,
            "prompt",
            "999",
        ),
        (text_request("x" * 2000), InvalidArgument, "prompt", "1000"),
    ],
)
def test_bad_requests_fail_before_submit(request_, error, field: str, words: str) -> None:
    scheduler = FakeScheduler(["abc"])
    engine, _ = make_engine(scheduler)
    with pytest.raises(error) as info:
        asyncio.run(collect(engine, request_))
    assert info.value.field == field and words in info.value.message
    assert scheduler.submitted == [] and engine.num_in_flight == 0


def test_chat_without_max_tokens_fills_the_context() -> None:
    scheduler = FakeScheduler(["ok"])
    engine, tokenizer = make_engine(scheduler)
    request = GenerationRequest(
        Prompt(PromptKind.CHAT, messages=[ChatMessage("user", "hey")]),
        SamplingParams(max_tokens=1),
        max_tokens_to_fill=True,
    )
    asyncio.run(collect(engine, request))
    (_, prompt_ids, sampling) = scheduler.submitted[0]
    assert sampling.max_tokens == MAX_MODEL_LEN - len(prompt_ids)
    assert tokenizer.encoded[0].kind is PromptKind.CHAT


def test_logprob_token_strings_ride_the_same_batch() -> None:
    scheduler = FakeScheduler(["ab"])
    engine, tokenizer = make_engine(scheduler)
    request = text_request("p", max_tokens=2, logprobs=1)
    request.logprob_token_strings = True
    result = asyncio.run(collect(engine, request))
    lps = result.choices[0].logprobs
    assert [(lp.token_id, lp.token, lp.top[0].token) for lp in lps] == [(97, "a", "a"), (98, "b", "b")]
    assert len(tokenizer.detokenizer.batches) == 2 and len(tokenizer.detokenizer.batches[0]) == 3


def test_duplicate_request_id_in_flight_is_rejected() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["abcd"], gate=asyncio.Event())
        engine, _ = make_engine(scheduler)
        first = engine.generate(
            GenerationRequest(Prompt(PromptKind.TEXT, text="p"), SamplingParams(), request_id="r1")
        )
        await anext(first)
        with pytest.raises(InvalidArgument, match="already in flight"):
            await anext(
                engine.generate(
                    GenerationRequest(Prompt(PromptKind.TEXT, text="p"), SamplingParams(), request_id="r1")
                )
            )
        await first.aclose()

    asyncio.run(scenario())


def test_request_timeout_aborts() -> None:
    from pagedserve.gateway.request_run import RequestTimeout

    async def scenario() -> FakeScheduler:
        scheduler = FakeScheduler(["abcdefgh"], gate=asyncio.Event())
        engine, _ = make_engine(scheduler, request_timeout=0.05)
        with pytest.raises(RequestTimeout, match="request-timeout"):
            async for _ in engine.generate(text_request("p", max_tokens=8)):
                pass
        await asyncio.sleep(0.01)
        assert engine.num_in_flight == 0
        return scheduler

    assert len(asyncio.run(scenario()).aborted) == 1


def test_ids_outside_the_tokenizer_vocabulary_are_not_sent_to_the_detokenizer() -> None:
    scheduler = FakeScheduler(["a\u0200b"])  # 0x200 = 512 >= the fake vocabulary of 300
    engine, tokenizer = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("p", max_tokens=3)))
    assert result.choices[0].token_ids == [97, 512, 98] and result.choices[0].text == "ab"
    assert all(t < 300 for batch in tokenizer.detokenizer.batches for item in batch for t in item.token_ids)


def test_a_scheduler_that_stops_answering_is_unavailable_not_a_hang() -> None:
    from pagedserve.common.errors import Unavailable

    class HungScheduler(FakeScheduler):
        alive = True

        async def stats(self, timeout=None) -> SchedulerStats:
            if not self.alive:
                raise Unavailable("scheduler at test is unavailable")
            return await super().stats()

        def submit(self, *args, **kwargs):
            stream = super().submit(*args, **kwargs)
            if not self.alive:  # a re-attach finds nobody either
                stream.break_after = 0
            return stream

    async def scenario() -> None:
        scheduler = HungScheduler(["abcdefgh"], gate=asyncio.Event())
        engine, _ = make_engine(scheduler, stall_probe_interval=0.02, stall_timeout=0.2)
        outputs = engine.generate(text_request("p", max_tokens=8))
        await anext(outputs)
        waiting = asyncio.ensure_future(anext(outputs))
        await asyncio.sleep(0.1)
        assert not waiting.done(), "a quiet but live scheduler is waited for"
        scheduler.alive = False
        with pytest.raises(Unavailable, match="scheduler"):
            await asyncio.wait_for(waiting, 1.0)

    asyncio.run(scenario())


def test_a_broken_scheduler_stream_is_reattached_with_what_the_client_has() -> None:
    """The scheduler goes away after 3 messages: the gateway re-attaches, saying which tokens it
    holds per choice, and the client sees every character once, in order."""
    scheduler = FakeScheduler(["abcdefgh", "ABCDEFGH"])
    scheduler.break_after = 3
    engine, _ = make_engine(scheduler)
    result = asyncio.run(collect(engine, text_request("p", max_tokens=8, n=2)))
    assert [c.text for c in result.choices] == ["abcdefgh", "ABCDEFGH"]
    assert len(scheduler.submitted) == 2
    assert scheduler.progress[0] is None
    assert scheduler.progress[1] == [(0, [ord(c) for c in "abc"], False), (1, [ord(c) for c in "ABC"], False)]
    assert scheduler.aborted == []


def test_a_scheduler_that_never_comes_back_fails_within_the_stall_timeout() -> None:
    from pagedserve.common.errors import Unavailable

    class GoneScheduler(FakeScheduler):
        def submit(self, *args, **kwargs):
            stream = super().submit(*args, **kwargs)
            stream.break_after = 0 if len(self.streams) > 1 else 2
            return stream

    async def scenario() -> float:
        engine, _ = make_engine(GoneScheduler(["abcdefgh"]), stall_timeout=0.5)
        start = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable, match="stall-timeout"):
            await collect(engine, text_request("p", max_tokens=8))
        return asyncio.get_running_loop().time() - start

    assert asyncio.run(scenario()) < 3.0


def test_token_ids_only_does_no_detokenizing() -> None:
    from dataclasses import replace

    scheduler = FakeScheduler(["abcd"])
    engine, tokenizer = make_engine(scheduler)
    request = replace(text_request("p", max_tokens=4), detokenize=False)
    result = asyncio.run(collect(engine, request))
    (choice,) = result.choices
    assert choice.token_ids == [ord(c) for c in "abcd"] and choice.text == ""
    assert choice.finish_reason == FinishReason.LENGTH
    assert tokenizer.detokenizer.batches == [], "no detokenizing work at all"
    with pytest.raises(InvalidArgument, match="stop strings need text"):
        asyncio.run(collect(engine, replace(text_request("p", stop=["x"], max_tokens=4), detokenize=False)))
