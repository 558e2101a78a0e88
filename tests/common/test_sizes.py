"""The one byte-size parser: a size means the same to `pagedserve up` and to each service."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.cli import build_parser
from pagedserve.common.sizes import parse_byte_size

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4096b", 4096),
        ("4096B", 4096),
        (" 7 ", 7),
        # A bare letter, or an IEC unit with an `i`: binary.
        ("4k", 4 * KIB),
        ("4K", 4 * KIB),
        ("4ki", 4 * KIB),
        ("4KiB", 4 * KIB),
        ("512m", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("4g", 4 * GIB),
        ("4G", 4 * GIB),
        ("4gi", 4 * GIB),
        ("4gib", 4 * GIB),
        ("4GiB", 4 * GIB),
        ("4 GiB", 4 * GIB),
        ("2t", 2 * TIB),
        ("2TiB", 2 * TIB),
        # An SI unit written with its B, no `i`: decimal.
        ("4kb", 4000),
        ("4KB", 4000),
        ("512MB", 512 * 10**6),
        ("4gb", 4 * 10**9),
        ("4GB", 4 * 10**9),
        ("2TB", 2 * 10**12),
        # Fractions, rounded down to whole bytes.
        ("1.5g", 3 * 2**29),
        ("0.5GB", 5 * 10**8),
        (".5k", 512),
        ("1.0001k", 1024),
        # Whole numbers stay exact however large.
        ("123456789012345678901", 123456789012345678901),
    ],
)
def test_parse_byte_size(text: str, value: int) -> None:
    assert parse_byte_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "g", "lots", "-1", "4x", "4ib", "4i", "4gibb", "4 g b", "1e9", "4pb", "0", "0.0001k", "0.5"]
)
def test_parse_byte_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_byte_size(text)


def test_up_and_executor_read_kv_cache_memory_alike() -> None:
    """The bug this parser fixed: `4g` was 10^9 bytes to the executor and 2^30 to `up`."""
    for text, value in [("4g", 4 * GIB), ("4GiB", 4 * GIB), ("4GB", 4 * 10**9), ("4096", 4096)]:
        up = build_parser("up").parse_args(["up", "--kv-cache-memory", text])
        executor = build_parser("executor").parse_args(["executor", "--kv-cache-memory", text])
        assert up.kv_cache_memory == executor.kv_cache_memory == value, text
