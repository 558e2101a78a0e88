"""ServedTokenizer: encode, chat rendering, decode and the validation in front of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pagedserve.common.errors import InvalidArgument
from pagedserve.tokenizer.core import ChatMessage, ServedTokenizer

TEXTS = ["Hello world!", "👩‍💻🎉", "你好世界", "café naïve", "def f(x):\n\treturn x  # ✨\n", " spaces  "]
CHAT = [ChatMessage("system", "You write Python."), ChatMessage("user", "Square x, 你好 👩‍💻")]


# The lossless families: byte-level BPE and byte fallback spell any text (the Unigram one
# has an <unk> and drops a leading space, as T5's does).
@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "bundled"])
@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tokenizer_for: Callable[[str], ServedTokenizer], family: str, text: str) -> None:
    served = tokenizer_for(family)
    encoding = served.encode(text)
    assert encoding.rendered_text == text
    assert encoding.token_ids == served.hf.encode(text, add_special_tokens=False)
    assert served.decode(encoding.token_ids) == text


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "bundled"])
def test_add_special_tokens_prepends_bos(
    tokenizer_for: Callable[[str], ServedTokenizer], family: str
) -> None:
    served = tokenizer_for(family)
    with_bos = served.encode("Hello", add_special_tokens=True).token_ids
    without = served.encode("Hello").token_ids
    assert with_bos == [served.bos_token_id, *without]
    assert served.decode(with_bos, skip_special_tokens=True) == "Hello"
    assert served.decode(with_bos) != "Hello"


@pytest.mark.parametrize("family", ["byte_level", "bundled"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_renders_with_the_template(
    tokenizer_for: Callable[[str], ServedTokenizer], family: str, add_generation_prompt: bool
) -> None:
    served = tokenizer_for(family)
    assert served.has_chat_template
    conversation = [{"role": m.role, "content": m.content} for m in CHAT]
    expected = served.hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    encoding = served.encode(CHAT, add_generation_prompt=add_generation_prompt)
    assert encoding.rendered_text == expected
    assert encoding.rendered_text.endswith("<|assistant|>\n") == add_generation_prompt
    assert encoding.token_ids == served.hf.encode(expected, add_special_tokens=False)
    assert encoding.token_ids[0] == served.bos_token_id  # the template writes BOS itself, once
    assert encoding.token_ids.count(served.bos_token_id) == 1
    assert served.decode(encoding.token_ids) == expected


def test_chat_needs_a_template(sentencepiece: ServedTokenizer) -> None:
    assert not sentencepiece.has_chat_template
    with pytest.raises(InvalidArgument, match="no chat template") as err:
        sentencepiece.encode(CHAT)
    assert err.value.field == "chat"


def test_chat_template_errors_are_invalid_argument(byte_level: ServedTokenizer) -> None:
    with pytest.raises(InvalidArgument, match="role must be system, user or assistant, not tool"):
        byte_level.encode([ChatMessage("tool", "42")])
    with pytest.raises(InvalidArgument, match=r"chat.messages is empty"):
        byte_level.encode([])
    with pytest.raises(InvalidArgument, match=r"chat.messages\[1\].role is empty"):
        byte_level.encode([ChatMessage("user", "hi"), ChatMessage("", "hi")])


def test_ids_outside_the_vocabulary(byte_level: ServedTokenizer) -> None:
    size = byte_level.vocab_size
    assert size == len(byte_level.hf)
    for bad, index in ((size, 1), (-1, 2), (2**31 - 1, 1)):
        ids = [5, 6, 7]
        ids[index] = bad
        with pytest.raises(InvalidArgument) as err:
            byte_level.decode(ids)
        assert err.value.message == (
            f"token_ids[{index}] = {bad} is outside the vocabulary: ids must be in [0, {size})"
        )
    assert byte_level.decode([size - 1]) == byte_level.hf.decode([size - 1])


def test_empty_input(byte_level: ServedTokenizer) -> None:
    with pytest.raises(InvalidArgument, match="text is empty"):
        byte_level.encode("")
    with pytest.raises(InvalidArgument, match="token_ids is empty"):
        byte_level.decode([])


def test_text_byte_limit(tokenizer_dirs: dict[str, Path]) -> None:
    served = ServedTokenizer.load(str(tokenizer_dirs["byte_level"]), max_input_bytes=12)
    assert served.encode("a" * 12).token_ids
    assert served.encode("你好世界").token_ids  # 12 bytes in 4 characters
    with pytest.raises(InvalidArgument, match="text is 13 bytes, over the limit of 12 bytes"):
        served.encode("a" * 13)
    with pytest.raises(InvalidArgument, match="text is 15 bytes, over the limit of 12 bytes"):
        served.encode("你好世界!!!")
    with pytest.raises(InvalidArgument, match="chat is .* bytes, over the limit of 12 bytes"):
        served.encode([ChatMessage("user", "hi")])  # the rendered template is over the limit
    with pytest.raises(
        InvalidArgument, match="chat is 33 bytes, over the limit of 12 bytes"
    ):  # 13 + "user" + 16
        served.encode([ChatMessage("user", "a" * 13)])  # every field counts, and each message 16 more
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        served.encode("\ud800")
    with pytest.raises(InvalidArgument, match="max_input_bytes must be >= 1"):
        ServedTokenizer.load(str(tokenizer_dirs["byte_level"]), max_input_bytes=0)


def test_facts(tokenizer_dirs: dict[str, Path], tokenizer_for: Callable[[str], ServedTokenizer]) -> None:
    byte_level = tokenizer_for("byte_level")
    hf = byte_level.hf
    assert byte_level.bos_token_id == hf.convert_tokens_to_ids("<|bos|>")
    # EOS first, then the other end ids of generation_config.json.
    assert byte_level.eos_token_ids == (
        hf.convert_tokens_to_ids("<|eos|>"),
        hf.convert_tokens_to_ids("<|end|>"),
    )
    assert byte_level.skipped_ids == frozenset(hf.all_special_ids)
    assert not byte_level.byte_fallback_ids
    assert not byte_level.cleans_up_spaces  # transformers never cleans up after BPE
    sentencepiece = tokenizer_for("sentencepiece")
    assert sentencepiece.eos_token_ids == (sentencepiece.hf.eos_token_id,)
    assert len(sentencepiece.byte_fallback_ids) == 256
    assert tokenizer_for("unigram_cleanup").cleans_up_spaces


def test_bundled_tokenizer(tokenizer_for: Callable[[str], ServedTokenizer]) -> None:
    bundled = tokenizer_for("bundled")
    hf = bundled.hf
    assert bundled.vocab_size == len(hf)
    assert bundled.eos_token_ids[0] == hf.eos_token_id
    assert hf.convert_tokens_to_ids("<|end|>") in bundled.eos_token_ids
    assert bundled.has_chat_template
    code = "def square(x):\n    return x * x\n"
    assert bundled.decode(bundled.encode(code).token_ids) == code
