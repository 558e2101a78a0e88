"""Core lists: the syntax of `taskset -c` and /sys/.../cpulist, and the cores a process may use."""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3): the list syntax of taskset -c and /sys/.../cpulist."""
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--cpu-affinity: {part!r} is not a core id or a range like 2-5")
        lo, hi = int(first), int(last or first)
        if lo > hi:
            raise ValueError(f"--cpu-affinity: range {part!r} is empty")
        cores.update(range(lo, hi + 1))
    if not cores:
        raise ValueError("--cpu-affinity names no cores")
    return tuple(sorted(cores))


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def format_cpu_list(cores: tuple[int, ...]) -> str:
    """(0, 2, 3, 4) -> '0,2-4', the syntax `parse_cpu_list` reads."""
    parts: list[str] = []
    start = prev = None
    for core in sorted(cores):
        if prev is not None and core == prev + 1:
            prev = core
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = core
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)
