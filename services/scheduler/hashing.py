"""Stable prefix-cache hashes for full KV blocks.

A block's hash chains its parent's hash with its own token ids, so equal hashes mean equal
prefixes (up to a collision, which the pool rules out by confirming the stored token ids and
parent hash on every hit). The hash is blake2b, salted per model and block size, so two
models never share cached blocks even when they share a pool id; Python's `hash()` is salted
per process and would break across scheduler restarts, so it is never used here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = ""  # the parent hash of a sequence's first block


def model_salt(model: str, block_size: int) -> bytes:
    """The per-model salt mixed into every block hash."""
    return hashlib.blake2b(f"pagedserve-prefix|{model}|{block_size}".encode(), digest_size=16).digest()


def block_hash(parent_hash: str, token_ids: Sequence[int], salt: bytes) -> str:
    """Hex digest (128 bits) of one full block, chained on its parent's hash."""
    h = hashlib.blake2b(salt, digest_size=16)
    h.update(parent_hash.encode())
    h.update(b"|")
    h.update(array("q", token_ids).tobytes())
    return h.hexdigest()


def token_str(token_ids: Sequence[int]) -> str:
    """Canonical text form of a block's token ids, stored beside its hash and compared on a hit."""
    return ",".join(map(str, token_ids))


def parse_token_str(text: str) -> list[int]:
    """The token ids of a `token_str`."""
    return [int(t) for t in text.split(",") if t]


class BlockHasher:
    """Computes the chain of full-block hashes of one token sequence, incrementally."""

    __slots__ = ("salt", "block_size")

    def __init__(self, salt: bytes, block_size: int) -> None:
        self.salt = salt
        self.block_size = block_size

    def extend(self, hashes: list[str], new_token_ids: Sequence[int]) -> None:
        """Append to `hashes` (the chain so far) the hash of every full block in `new_token_ids`,
        the tokens that follow the blocks already hashed."""
        bs = self.block_size
        for start in range(0, len(new_token_ids) - bs + 1, bs):
            parent = hashes[-1] if hashes else ROOT_HASH
            # A global looked up at call time, so a test can force collisions by patching it.
            hashes.append(block_hash(parent, new_token_ids[start : start + bs], self.salt))
