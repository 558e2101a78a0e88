"""Ports picked for servers that start later: no two picks may name the same port."""

from __future__ import annotations

import collections
import socket

from pagedserve.common import redis_harness
from pagedserve.common.redis_harness import free_port, free_ports


def test_picks_never_repeat_before_their_servers_bind() -> None:
    # The kernel hands a just-released port out again readily; nothing binds these ports here,
    # which is the window in which a launcher's five ports once came out with two alike (a
    # thousand separate binds to port 0 repeat about thirty times here).
    picked = [free_port() for _ in range(500)] + free_ports(500)
    assert len(set(picked)) == len(picked)


def test_a_picked_port_can_be_bound() -> None:
    for port in free_ports(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_ports_promised_elsewhere_are_avoided(monkeypatch) -> None:
    # Another process's picks (the launcher's Redis port beside the services' ports it was
    # given) are not in this process's memory: `avoid` names them.
    monkeypatch.setattr(redis_harness, "_RECENT_PORTS", collections.deque(maxlen=1024))
    promised = set(free_ports(500))
    monkeypatch.setattr(redis_harness, "_RECENT_PORTS", collections.deque(maxlen=1024))
    assert not promised & set(free_ports(500, avoid=promised))
