"""The `pagedserve` command."""
from __future__ import annotations

def main() -> None:
    print("pagedserve")
