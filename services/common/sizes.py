"""Byte sizes given on the command line: one parser, so a size means the same in every command.

`parse_byte_size` reads a plain byte count or a number with a unit. Which units are binary:

| written | means | why |
|---|---|---|
| `4096`, `4096b` | 4096 bytes | |
| `4k`, `4m`, `4g`, `4t` (any case) | 4 x 2^10, 2^20, 2^30, 2^40 | a bare letter is how memory is usually meant: `java -Xmx4g`, `docker --memory 4g` and vLLM's `--kv-cache-memory` users think of GiB |
| `4ki`, `4kib`, `4GiB` (any case) | 4 x 2^10 ... 2^40 | IEC binary units, as in Kubernetes' `Gi` |
| `4kb`, `4GB` (any case) | 4 x 10^3 ... 10^12 | an SI unit with its `B` says decimal, as disk makers and Kubernetes' `G` use it |

So only a unit that ends in `B` without an `i` is decimal; everything else is binary. A
fraction is allowed (`1.5g`); the result is rounded down to whole bytes and must be > 0.
"""

from __future__ import annotations

import argparse
import re

_PREFIXES = "kmgt"  # kilo, mega, giga, tera: the power is the index + 1
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)(b?)|(b?))\s*")


def parse_byte_size(text: str) -> int:
    """'4096' -> 4096; '4g', '4GiB' -> 4 * 2**30; '4GB' -> 4 * 10**9 (see the module docstring).

    Raises argparse.ArgumentTypeError for anything else, whose message argparse shows as is:
    it can be an argparse `type=` directly.
    """
    match = _SIZE.fullmatch(text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a size in bytes: {text!r} (e.g. 4294967296, 4g or 4GiB = 4 x 2^30, 4GB = 4 x 10^9)"
        )
    number, prefix, binary, b, _ = match.groups()
    if prefix is None:
        scale = 1
    else:
        base = 1000 if b and not binary else 1024
        scale = base ** (_PREFIXES.index(prefix) + 1)
    # int(number) when it is whole, so that large counts are exact (no float rounding).
    value = int(number) * scale if number.isdigit() else int(float(number) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of `b` hold `a` (tokens into blocks, bytes into pages)."""
    return -(-a // b)
