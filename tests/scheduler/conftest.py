"""Fixtures for the scheduler tests: block pools of both kinds on a real Redis, a tiny random model,
and the random models of the beam search tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pagedserve.scheduler.memory_pool import InMemoryBlockPool
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .beam_harness import VOCAB, save_with_likely_eos

_pool_ids = itertools.count()
TINY_VOCAB = 512  # the vocabulary of `tiny_model`


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama (GQA 2:1), made once."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def make_pool(kind: str, client, num_blocks: int, block_size: int, num_cpu_blocks: int = 0):
    if kind == "memory":
        pool = InMemoryBlockPool()
    else:
        pool = RedisBlockPool(client, f"test-{next(_pool_ids)}")
    pool.init(num_blocks, block_size, "epoch-0", "model", num_cpu_blocks)
    return pool


@pytest.fixture(params=["memory", "redis"])
def pool_factory(request, redis_client):
    """Builds pools of the parametrized kind; each is checked by fsck when the test ends."""
    made = []

    def factory(num_blocks: int = 8, block_size: int = 4, num_cpu_blocks: int = 0):
        pool = make_pool(request.param, redis_client, num_blocks, block_size, num_cpu_blocks)
        made.append(pool)
        return pool

    yield factory
    for pool in made:
        assert pool.check() == []


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def random_model(request, tmp_path_factory) -> tuple[Path, int]:
    """A random Llama or Qwen2 whose greedy continuation of PROBE reaches its EOS (beam search tests)."""
    torch.manual_seed(7)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    config = LlamaConfig(**common) if request.param == "llama" else Qwen2Config(**common)
    path = tmp_path_factory.mktemp(f"beam-{request.param}")
    eos = save_with_likely_eos(AutoModelForCausalLM.from_config(config), path)
    return path, eos
