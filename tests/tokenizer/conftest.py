"""Tokenizers built in the test from tiny in-memory corpora, and an in-process server.

The families the detokenizer must get right:
- `byte_level`: byte-level BPE (GPT-2 style, like the bundled model's): any byte string
  round-trips, and a multi-byte character can be split across tokens, so a prefix of the
  ids can decode to a trailing U+FFFD;
- `sentencepiece`: Llama-2 style BPE over `▁`-joined words, the leading space stripped from
  the whole text, and `<0xNN>` byte-fallback tokens for characters outside the vocabulary,
  which decode all-or-nothing (a run that is not valid UTF-8 gives one U+FFFD per byte);
- `unigram_cleanup`: a SentencePiece-style Unigram model with transformers'
  `clean_up_tokenization_spaces=True`, which rewrites `" ."` to `"."` after decoding;
- `bundled`: the tokenizer of models/tiny-py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pagedserve.tokenizer.core import ServedTokenizer
from pagedserve.tokenizer.server import TokenizerConfig, start_server

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "café au lait, crème brûlée, déjà vu",
    "你好世界，今天天气很好。",
    "emoji: 👩‍💻🎉 🚀 ✨",
    "Naïve résumé, Ελληνικά, русский текст.",
    "don't stop . it's fine , isn't it ? you 're right !",
] * 4

# Like the bundled model's template: `<|role|>\ncontent<|end|>\n` per turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BYTE_LEVEL_SPECIALS = ["<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
T = TypeVar("T")
FAMILIES = ["byte_level", "sentencepiece", "unigram_cleanup", "bundled"]


def build_byte_level_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with a chat template; encoding prepends `<|bos|>`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = bpe.token_to_id("<|bos|>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=BYTE_LEVEL_SPECIALS[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_sentencepiece_byte_fallback(vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """Llama-2 style: BPE with `<0x00>`..`<0xFF>` byte fallback, `▁` for spaces, no chat template.

    The merges are learned from the ASCII lines of the corpus (plus "café"), so CJK, emoji and
    most accented letters are spelled with byte tokens.
    """
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    learner.train_from_iterator([line for line in CORPUS if line.isascii()] + ["café"], trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {}
    for token in [*specials, *(f"<0x{b:02X}>" for b in range(256)), *learned["vocab"]]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    spm = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    spm.normalizer = normalizer
    spm.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spm.add_special_tokens(specials)
    spm.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_unigram_cleanup(vocab_size: int = 150) -> PreTrainedTokenizerFast:
    """T5 style: Unigram with Metaspace, and transformers' space clean-up on decode."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=unigram,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=True,
    )


BUILDERS = {
    "byte_level": build_byte_level_bpe,
    "sentencepiece": build_sentencepiece_byte_fallback,
    "unigram_cleanup": build_unigram_cleanup,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails the test instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each built family saved as a tokenizer folder, as `AutoTokenizer` loads it."""
    dirs = {}
    for name, build in BUILDERS.items():
        path = tmp_path_factory.mktemp(name)
        build().save_pretrained(path, save_jinja_files=False)
        dirs[name] = path
    # The byte-level folder also ends generation on <|end|>, as the bundled model does.
    (dirs["byte_level"] / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return dirs


@pytest.fixture(scope="session")
def loaded_tokenizers() -> dict[str, ServedTokenizer]:
    """Tokenizers loaded so far, by family: each folder is loaded once per session."""
    return {}


def served_tokenizer(request: pytest.FixtureRequest, family: str) -> ServedTokenizer:
    """The family's tokenizer loaded from its folder; the bundled one only when asked for,
    so that a missing models/tiny-py fails only the tests that use it."""
    loaded = request.getfixturevalue("loaded_tokenizers")
    if family not in loaded:
        if family == "bundled":
            path = request.getfixturevalue("bundled_model_path")
        else:
            path = str(request.getfixturevalue("tokenizer_dirs")[family])
        loaded[family] = ServedTokenizer.load(path)
    return loaded[family]


@pytest.fixture(params=FAMILIES)
def served(request: pytest.FixtureRequest) -> ServedTokenizer:
    """Each family in turn."""
    return served_tokenizer(request, request.param)


@pytest.fixture
def tokenizer_for(request: pytest.FixtureRequest) -> Callable[[str], ServedTokenizer]:
    """`tokenizer_for(family)`, for tests that pick their own families."""
    return lambda family: served_tokenizer(request, family)


@pytest.fixture
def byte_level(request: pytest.FixtureRequest) -> ServedTokenizer:
    return served_tokenizer(request, "byte_level")


@pytest.fixture
def sentencepiece(request: pytest.FixtureRequest) -> ServedTokenizer:
    return served_tokenizer(request, "sentencepiece")


class ServerThread:
    """The real gRPC server on its own event loop in a background thread, so that tests can
    call it with the ordinary blocking stubs."""

    def __init__(self, config: TokenizerConfig, tokenizer: ServedTokenizer) -> None:
        self.tokenizer = tokenizer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)
        self.thread.start()
        self.server = self._call(start_server(tokenizer, config))
        self.address = f"127.0.0.1:{self.server.bound_port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def grpc_server(tokenizer_dirs: dict[str, Path]):
    """The byte-level tokenizer served on a free port with a 1,000-byte input limit."""
    config = TokenizerConfig(
        model=str(tokenizer_dirs["byte_level"]), host="127.0.0.1", port=0, max_input_bytes=1000
    )
    server = ServerThread(config, ServedTokenizer.load(config.model, max_input_bytes=config.max_input_bytes))
    yield server
    server.stop()
