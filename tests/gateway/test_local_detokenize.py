"""The gateway's in-process detokenizer gives the tokenizer service's text, byte for byte."""

from __future__ import annotations

import asyncio
import random

import pytest

from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.datatypes import DetokenizeItem
from pagedserve.gateway.local_detokenize import LocalDetokenizer
from pagedserve.tokenizer.core import ServedTokenizer


@pytest.fixture(scope="module")
def served(bundled_model_path: str) -> ServedTokenizer:
    return ServedTokenizer.load(bundled_model_path)


def test_deltas_add_up_to_what_the_generated_ids_decode_to(served: ServedTokenizer) -> None:
    local = LocalDetokenizer(served)
    rng = random.Random(3)
    vocab = served.hf.vocab_size
    prompts = [served.encode("def fibonacci(n):\n").token_ids, served.encode("class A:").token_ids, []]
    generated = {i: [rng.randrange(vocab) for _ in range(40)] for i in range(len(prompts))}
    texts = {i: "" for i in range(len(prompts))}

    async def run() -> None:
        started: set[int] = set()
        for start in range(0, 40, 7):  # steps of 7 ids, all sequences in one call per step
            items = []
            for i, prompt in enumerate(prompts):
                chunk = generated[i][start : start + 7]
                items.append(
                    DetokenizeItem(
                        key=f"r/{i}",
                        token_ids=chunk,
                        prompt_token_ids=[] if i in started else prompt,
                        finish=start + 7 >= 40,
                    )
                )
                started.add(i)
            for i, text in enumerate(await local.detokenize(items, local.begin())):
                texts[i] += text

    asyncio.run(run())
    for i, prompt in enumerate(prompts):
        whole = served.decode(prompt + generated[i])
        expected = whole[len(served.decode(prompt)) :] if prompt else whole
        assert texts[i] == expected and expected
    assert local.num_sequences == 0, "finished sequences are forgotten"


def test_release_forgets_and_bad_ids_are_refused(served: ServedTokenizer) -> None:
    local = LocalDetokenizer(served)

    async def run() -> None:
        await local.detokenize([DetokenizeItem(key="a/0", token_ids=[5, 6])])
        assert local.num_sequences == 1
        local.release(["a/0", "never/0"])
        assert local.num_sequences == 0
        with pytest.raises(InvalidArgument):
            await local.detokenize([DetokenizeItem(key="b/0", token_ids=[10**9])])
        assert local.num_sequences == 0

    asyncio.run(run())
