"""Every service runs on uvloop when it is installed (a dependency off Windows), asyncio's own
loop when PAGEDSERVE_UVLOOP switches it off."""

from __future__ import annotations

import asyncio

import pytest
import uvloop  # a dependency: its absence fails here, it is not skipped

from pagedserve.common import event_loop


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_services_run_on_uvloop(monkeypatch):
    monkeypatch.delenv(event_loop.ENV_SWITCH, raising=False)
    assert event_loop.run(_loop_type()) is uvloop.Loop


@pytest.mark.parametrize("off", ["0", "off", "false"])
def test_the_switch_keeps_asyncios_loop(monkeypatch, off):
    monkeypatch.setenv(event_loop.ENV_SWITCH, off)
    kind = event_loop.run(_loop_type())
    assert kind is not uvloop.Loop and issubclass(kind, asyncio.BaseEventLoop)
