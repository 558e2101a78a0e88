"""Sections of docs/BENCHMARKS.md that a separate benchmark writes between two HTML comment
markers (`<!-- NAME-section:begin -->` ... `<!-- NAME-section:end -->`), so that a suite run,
which rewrites the rest of the file, keeps them."""

from __future__ import annotations

import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}-section:begin -->", f"<!-- {name}-section:end -->"


def _pattern(name: str) -> re.Pattern[str]:
    begin, end = markers(name)
    return re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)


def existing_section(text: str, name: str) -> str | None:
    """The section, markers included, or None."""
    match = _pattern(name).search(text)
    return match.group(0) if match else None


def replace_section(text: str, name: str, section: str) -> str:
    """`text` with its section replaced by `section` (markers included), or `section` appended."""
    pattern = _pattern(name)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return text.rstrip("\n") + "\n\n" + section + "\n"


def write_section(docs: Path, name: str, section: str) -> None:
    old = docs.read_text() if docs.exists() else "# Benchmarks\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(replace_section(old, name, section))
