"""`common/process.py` on its own: children that die with their parent (PR_SET_PDEATHSIG),
and the restart policy's backoff and limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedserve.common.process import RestartHistory, RestartPolicy

# A parent that starts one sleeping child through ChildProcess, prints its pid, and sleeps.
PARENT = """
import signal, sys, time
from pagedserve.common.process import ChildProcess
sig = signal.SIGTERM if sys.argv[1] == "pdeathsig" else None
child = ChildProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
                     parent_death_signal=sig).start()
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def orphan_after_parent_is_killed(mode: str, wait: float) -> tuple[int, bool]:
    """SIGKILL a parent that started a child in `mode`; (the child's pid, whether it died
    within `wait` s)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + wait
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, not alive(child)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_child_gets_sigterm_when_its_parent_is_sigkilled():
    _, died = orphan_after_parent_is_killed("pdeathsig", wait=10.0)
    assert died


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_without_it_the_child_outlives_a_sigkilled_parent():
    """The control: what the launcher's children did before they asked to die with it."""
    child, died = orphan_after_parent_is_killed("none", wait=1.0)
    try:
        assert not died
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_restart_backoff_doubles_up_to_its_cap_then_the_limit_says_no():
    history = RestartHistory(RestartPolicy(max_restarts=6, window=60.0, backoff=0.5, max_backoff=4.0))
    delays = [history.schedule(now) for now in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert history.schedule(6.0) is None  # a 7th restart within 60 s
    assert history.recent(6.0) == 6


def test_restarts_older_than_the_window_no_longer_count():
    history = RestartHistory(RestartPolicy(max_restarts=2, window=10.0, backoff=1.0, max_backoff=10.0))
    assert history.schedule(0.0) == 1.0
    assert history.schedule(5.0) == 2.0
    assert history.schedule(9.0) is None
    # At 10 s the first restart leaves the window: one more is allowed, backed off as the second.
    assert history.schedule(10.0) == 2.0
    assert history.schedule(14.0) is None
    assert history.recent(30.0) == 0
    assert history.schedule(30.0) == 1.0


def test_zero_restarts_allowed_means_none():
    assert RestartHistory(RestartPolicy(max_restarts=0)).schedule(0.0) is None


@pytest.mark.parametrize(
    "bad", [dict(max_restarts=-1), dict(window=0.0), dict(backoff=-1.0), dict(backoff=20.0, max_backoff=10.0)]
)
def test_restart_policy_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        RestartPolicy(**bad)
