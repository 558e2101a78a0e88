"""The event loop every service runs on: uvloop where it is installed, asyncio's own otherwise.

Each token a step produces crosses three event loops (the scheduler's gRPC stream to the gateway,
the gateway's SSE write to its client) and the executor's loop takes every step; with asyncio's
pure-Python selector loop a socket write costs several times what uvloop's C transport does.
`PAGEDSERVE_UVLOOP=0` keeps asyncio's loop (for comparing the two, or where uvloop misbehaves).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pagedserve.common.switches import switched_on

log = logging.getLogger(__name__)

ENV_SWITCH = "PAGEDSERVE_UVLOOP"
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default (switched off, or not installed)."""
    if not switched_on(ENV_SWITCH):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
