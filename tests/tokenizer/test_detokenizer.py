"""IncrementalDetokenizer: deltas that never change, never split a character, and join to
exactly what a one-shot decode of the same ids gives."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.common.errors import InvalidArgument
from pagedserve.tokenizer.core import ServedTokenizer
from pagedserve.tokenizer.detokenizer import REPLACEMENT_CHAR

TEXTS = [
    "👩‍💻🎉",
    "你好世界",
    "café naïve",
    "Hello 你好, 👩‍💻🎉 café naïve!",
    "def add(a, b):\n    return a + b  # ✨ done\n",
    "don't stop . it's fine , isn't it ?",
    " leading space and trailing one ",
]


def stream(
    served: ServedTokenizer,
    ids: Sequence[int],
    chunks: Sequence[int] | None = None,
    *,
    prompt: Sequence[int] = (),
    skip_special_tokens: bool = False,
) -> list[str]:
    """Feed `ids` in chunks of the given sizes (one at a time when None); every delta, then finish's."""
    detok = served.detokenizer(prompt, skip_special_tokens=skip_special_tokens)
    deltas, pos = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
    assert pos >= len(ids)
    deltas.append(detok.finish())
    return deltas


def random_chunks(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.randint(1, 5))
    return sizes


def assert_exact(deltas: list[str], expected: str) -> None:
    assert "".join(deltas) == expected
    if REPLACEMENT_CHAR not in expected:
        assert not [d for d in deltas if REPLACEMENT_CHAR in d]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode(served: ServedTokenizer, text: str) -> None:
    ids = served.hf.encode(text, add_special_tokens=True)
    rng = random.Random(text)
    for skip in (False, True):
        expected = served.hf.decode(ids, skip_special_tokens=skip)
        assert_exact(stream(served, ids, skip_special_tokens=skip), expected)
        for _ in range(5):
            chunks = random_chunks(rng, len(ids))
            assert_exact(stream(served, ids, chunks, skip_special_tokens=skip), expected)
        assert_exact(stream(served, ids, [len(ids)], skip_special_tokens=skip), expected)


def test_byte_level_holds_a_split_character_until_it_is_complete(byte_level: ServedTokenizer) -> None:
    # The byte-level tokenizer spells this emoji with tokens that cut its 4 UTF-8 bytes.
    ids = byte_level.hf.encode("🎉", add_special_tokens=False)
    assert byte_level.hf.decode(ids[:1]).endswith(REPLACEMENT_CHAR)
    deltas = stream(byte_level, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1)
    assert "".join(deltas) == "🎉"


def test_byte_fallback_run_is_emitted_when_it_ends(sentencepiece: ServedTokenizer) -> None:
    ids = sentencepiece.hf.encode("你好 world", add_special_tokens=False)
    tokens = sentencepiece.hf.convert_ids_to_tokens(ids)
    byte_tokens = [t for t in tokens if t.startswith("<0x")]
    assert len(byte_tokens) == 6, tokens  # 你好 is spelled with byte-fallback tokens
    deltas = stream(sentencepiece, ids)
    # Nothing comes out while the run of byte tokens may still go on (a bad byte later would
    # turn all of it into U+FFFD); the whole run comes out with the first ordinary token.
    first_plain = next(i for i, t in enumerate(tokens) if i > 1 and not t.startswith("<0x"))
    assert deltas[:first_plain] == [""] * first_plain
    assert deltas[first_plain].startswith("你好")
    assert "".join(deltas) == "你好 world"


def test_invalid_byte_run_decodes_all_or_nothing(sentencepiece: ServedTokenizer) -> None:
    vocab = sentencepiece.hf.get_vocab()
    byte = {b: vocab[f"<0x{b:02X}>"] for b in (0xC3, 0xA9, 0xE2)}
    world = sentencepiece.hf.encode("world", add_special_tokens=False)
    # é (C3 A9) is complete after two tokens, but E2 then makes the run invalid.
    ids = [byte[0xC3], byte[0xA9], byte[0xE2], *world]
    expected = sentencepiece.hf.decode(ids)
    assert expected.startswith(REPLACEMENT_CHAR * 3)
    assert_exact(stream(sentencepiece, ids), expected)


def test_skipped_special_tokens_anywhere(served: ServedTokenizer) -> None:
    words = served.hf.encode("Hello world, café", add_special_tokens=False)
    specials = sorted(served.skipped_ids)
    assert specials
    ids = [specials[0], *words[:2], *specials, *words[2:], specials[-1]]
    for skip in (False, True):
        assert_exact(
            stream(served, ids, skip_special_tokens=skip), served.hf.decode(ids, skip_special_tokens=skip)
        )


def test_prompt_gives_context_and_is_not_emitted(sentencepiece: ServedTokenizer) -> None:
    hf = sentencepiece.hf
    prompt = hf.encode("Hello", add_special_tokens=True)
    generated = hf.encode("world", add_special_tokens=False)  # `▁world`, spelled in pieces
    # Alone, `▁world` loses its space as the start of a text; after the prompt it keeps it.
    assert hf.decode(generated) == "world"
    full = hf.decode(prompt + generated, skip_special_tokens=True)
    assert full == "Hello world"
    for skip in (False, True):
        deltas = stream(sentencepiece, generated, prompt=prompt, skip_special_tokens=skip)
        assert "".join(deltas) == " world"


@pytest.mark.parametrize("family", ["byte_level", "bundled"])
def test_prompt_context_changes_nothing_for_byte_level(
    tokenizer_for: Callable[[str], ServedTokenizer], family: str
) -> None:
    served = tokenizer_for(family)
    prompt = served.hf.encode("café ", add_special_tokens=True)
    generated = served.hf.encode("naïve 👩‍💻🎉 你好世界", add_special_tokens=False)
    for skip in (False, True):
        deltas = stream(served, generated, prompt=prompt, skip_special_tokens=skip)
        assert_exact(deltas, served.hf.decode(generated, skip_special_tokens=skip))


def test_work_per_token_is_bounded_by_the_window(served: ServedTokenizer) -> None:
    ids = served.hf.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 500
    longest_byte_run, run = 0, 0
    for token in ids:
        run = run + 1 if token in served.byte_fallback_ids else 0
        longest_byte_run = max(longest_byte_run, run)
    detok = served.detokenizer()
    widest = 0
    for token in ids:
        detok.add([token])
        widest = max(widest, len(detok.window))
    # The window spans the previous step's ids plus the held ones; each is at most the tokens
    # of one character or one run of byte-fallback tokens, never the whole sequence.
    assert widest <= 2 * (4 + longest_byte_run), (widest, longest_byte_run)
    assert detok.finish() is not None


def test_finish_twice_and_add_after_finish(byte_level: ServedTokenizer) -> None:
    detok = byte_level.detokenizer()
    ids = byte_level.hf.encode("🎉", add_special_tokens=False)
    assert detok.add(ids[:1]) == ""
    assert detok.finish() == byte_level.hf.decode(ids[:1])  # an unfinished character is flushed as is
    assert detok.finish() == ""
    with pytest.raises(InvalidArgument, match="finished"):
        detok.add(ids[1:])


def test_out_of_vocab_ids_are_rejected(byte_level: ServedTokenizer) -> None:
    detok = byte_level.detokenizer()
    with pytest.raises(
        InvalidArgument, match=rf"{byte_level.vocab_size} is outside.*\[0, {byte_level.vocab_size}\)"
    ):
        detok.add([5, byte_level.vocab_size])
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        byte_level.detokenizer([-1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_stream_exactly(served: ServedTokenizer, data: st.DataObject) -> None:
    """Any ids at all, including lone bytes, broken characters and special tokens."""
    byte_ids = sorted(served.byte_fallback_ids) or [0]
    token = st.one_of(
        st.integers(0, served.vocab_size - 1),
        st.sampled_from(byte_ids),  # runs of byte-fallback tokens, valid UTF-8 or not
        st.sampled_from(sorted(served.skipped_ids) or [0]),
    )
    ids = data.draw(st.lists(token, min_size=1, max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 6), min_size=len(ids), max_size=len(ids)), label="chunks")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    deltas = stream(served, ids, chunks, skip_special_tokens=skip)
    assert "".join(deltas) == served.hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "bundled"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_prompt_and_ids_stream_exactly(
    tokenizer_for: Callable[[str], ServedTokenizer], family: str, data: st.DataObject
) -> None:
    """With a prompt, the deltas are what the generated ids add to the prompt's text; a prompt
    that ends inside a character (or a byte run) gives no context."""
    served = tokenizer_for(family)
    token = st.one_of(
        st.integers(0, served.vocab_size - 1),
        st.sampled_from(sorted(served.byte_fallback_ids) or [0]),
        st.sampled_from(sorted(served.skipped_ids)),
    )
    prompt = data.draw(st.lists(token, min_size=1, max_size=12), label="prompt")
    ids = data.draw(st.lists(token, min_size=1, max_size=20), label="ids")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    deltas = stream(served, ids, prompt=prompt, skip_special_tokens=skip)

    def decode(token_ids: list[int]) -> str:
        return served.hf.decode(token_ids, skip_special_tokens=skip)

    kept = [t for t in prompt if not (skip and t in served.skipped_ids)]
    if not kept or kept[-1] in served.byte_fallback_ids or decode(kept).endswith(REPLACEMENT_CHAR):
        assert "".join(deltas) == decode(ids)
    else:
        full, prompt_text = decode(kept + ids), decode(kept)
        assert full.startswith(prompt_text)
        assert "".join(deltas) == full[len(prompt_text) :]
