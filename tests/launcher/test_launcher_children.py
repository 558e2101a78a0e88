"""The launcher's process handling, driven in-process with stand-in services
(tests/launcher/fake_service.py): start order, failure reports, timeouts, restarts and
their limit, and stopping with nothing left behind — grandchildren and SIGTERM-deaf
processes included."""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.redis_harness import free_port
from pagedserve.launch_plan import LauncherConfig, ServiceSpec
from pagedserve.launcher import READY, Launcher

FAKE = str(Path(__file__).with_name("fake_service.py"))


def fake(name: str, *flags: str, needs: tuple[str, ...] = (), tier: int = 0) -> ServiceSpec:
    port = free_port()
    command = (sys.executable, FAKE, "--port", str(port), *flags)
    return ServiceSpec(name, command, f"127.0.0.1:{port}", (port,), needs, tier)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Run:
    """A Launcher serving `specs` on a background thread, its output captured."""

    def __init__(self, specs: list[ServiceSpec], **config: object) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        cfg = LauncherConfig(model="unused", **{"startup_timeout": 60.0, "stop_timeout": 5.0, **config})
        self.launcher = Launcher(cfg, out=self.out, err=self.err)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._serve, args=(specs,), daemon=True)
        self.thread.start()

    def _serve(self, specs: list[ServiceSpec]) -> None:
        self.code = self.launcher.serve(specs)

    def output(self) -> str:
        return self.out.getvalue() + self.err.getvalue()

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Until `text` is in the launcher's output (stdout or stderr)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.thread.is_alive(), f"launcher returned {self.code} before {text!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{self.output()}"
            time.sleep(0.05)

    def join(self, timeout: float = 60.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"launcher still running after {timeout}s:\n{self.output()}"
        assert self.code is not None
        return self.code

    def pids(self) -> list[int]:
        return [child.pid for _, child in self.launcher.children.values()]


def test_tiers_start_in_order_and_stop_leaves_nothing_behind():
    first = fake("tokenizer", "--grandchild")
    second = fake("scheduler", needs=("tokenizer",), tier=1)
    run = Run([first, second])
    run.wait_for(READY)
    out = run.out.getvalue()
    assert out.index("tokenizer is serving") < out.index("started scheduler"), out
    assert health_check(first.health_address) and health_check(second.health_address)
    # The children's own output reaches the terminal with their name in front.
    assert re.search(r"^tokenizer +\| fake serving on", out, re.M), out
    grandchild = int(re.search(r"grandchild pid (\d+)", out)[1])
    pids = run.pids()
    assert all(alive(pid) for pid in [*pids, grandchild])

    run.launcher.request_stop()
    assert run.join() == 0
    # The grandchild ignores SIGTERM and outlives its parent: only the group SIGKILL ends it.
    assert not [pid for pid in [*pids, grandchild] if alive(pid)], run.output()
    out = run.out.getvalue()
    assert out.index("stopping scheduler") < out.index("stopping tokenizer"), out


def test_child_failing_at_startup_is_reported_and_the_rest_stopped():
    healthy = fake("executor")
    broken = fake("tokenizer", "--mode", "fail")
    run = Run([healthy, broken])
    assert run.join() == 1
    err = run.err.getvalue()
    assert "tokenizer exited with code 3 during start-up" in err, run.output()
    assert "OSError: fake: no model at /no/such/model" in err, run.output()
    assert READY not in run.out.getvalue()
    assert not [pid for pid in run.pids() if alive(pid)]


def test_child_never_serving_hits_the_startup_timeout():
    run = Run([fake("executor", "--mode", "hang")], startup_timeout=2.0)
    assert run.join() == 1
    assert "executor did not report SERVING" in run.err.getvalue(), run.output()
    assert not [pid for pid in run.pids() if alive(pid)]


def test_stop_during_startup_exits_128_plus_the_signal():
    run = Run([fake("executor", "--mode", "hang")])
    run.wait_for("started executor")
    run.launcher.request_stop(signal.SIGINT)
    assert run.join() == 128 + signal.SIGINT
    assert "interrupted during start-up" in run.out.getvalue()
    assert not [pid for pid in run.pids() if alive(pid)]


def test_child_dying_while_serving_stops_the_rest_with_no_restart():
    steady = fake("tokenizer")
    flaky = fake("executor", "--exit-after", "1.5")
    run = Run([steady, flaky], restart=False)
    run.wait_for(READY)
    assert run.join() == 1
    err = run.err.getvalue()
    assert "executor exited with code 5 while serving; stopping the rest (--no-restart)" in err, run.output()
    assert "fake giving up after 1.5s" in err
    assert "restarted" not in run.output()
    assert not [pid for pid in run.pids() if alive(pid)]


def test_child_killed_while_serving_is_restarted_once_its_group_is_gone():
    steady = fake("tokenizer")
    victim = fake("executor", "--grandchild")
    run = Run([steady, victim])
    run.wait_for(READY)
    old = run.launcher.children["executor"][1].pid
    grandchild = int(re.search(r"grandchild pid (\d+)", run.output())[1])
    os.kill(old, signal.SIGKILL)

    run.wait_for("restarted executor (pid ")
    # The old group (its SIGTERM-deaf grandchild too) is gone before the new one starts.
    assert not alive(grandchild), run.output()
    new = int(re.search(r"restarted executor \(pid (\d+)\)", run.output())[1])
    assert new != old and not alive(old) and alive(new)
    run.wait_for(f"executor is serving again at {victim.health_address} (pid {new})")
    assert health_check(victim.health_address)
    err = run.err.getvalue()
    assert (
        "executor was killed by SIGKILL while serving; restarting it in 0.5s (restart 1 of at most 5" in err
    )

    pids = run.pids()
    run.launcher.request_stop()
    assert run.join() == 0
    assert not [pid for pid in pids if alive(pid)], run.output()


def test_a_child_that_keeps_dying_stops_everything_past_the_restart_limit():
    steady = fake("tokenizer")
    flaky = fake("executor", "--exit-after", "1.0")
    started = time.monotonic()
    run = Run([steady, flaky], max_restarts=2, restart_backoff=0.1)
    assert run.join() == 1
    err = run.err.getvalue()
    # Two restarts, the second after twice the first's backoff; the third death is one too many.
    assert "executor exited with code 5 while serving; restarting it in 0.1s (restart 1 of at most 2" in err
    assert "restarting it in 0.2s (restart 2 of at most 2" in err, run.output()
    assert run.out.getvalue().count("restarted executor (pid") == 2
    assert (
        "it was restarted 2 times within 60s (--max-restarts 2, --restart-window 60); stopping everything"
        in err
    )
    assert "fake giving up after 1.0s" in err
    assert time.monotonic() - started < 30
    assert not [pid for pid in run.pids() if alive(pid)]


def test_stop_request_during_a_restart_backoff_is_prompt():
    run = Run([fake("executor")], restart_backoff=30.0, restart_backoff_max=30.0)
    run.wait_for(READY)
    (pid,) = run.pids()
    os.kill(pid, signal.SIGKILL)
    run.wait_for("restarting it in 30s")
    started = time.monotonic()
    run.launcher.request_stop()
    assert run.join() == 0
    assert time.monotonic() - started < 3, run.output()
    assert "restarted executor" not in run.output()


def test_sigterm_deaf_child_is_killed_after_the_stop_timeout():
    run = Run([fake("gateway", "--mode", "stubborn")], stop_timeout=1.0)
    run.wait_for(READY)
    (pid,) = run.pids()
    started = time.monotonic()
    run.launcher.request_stop()
    assert run.join() == 0
    assert 0.9 < time.monotonic() - started < 10
    assert not alive(pid)


def test_second_stop_request_skips_the_grace_period():
    run = Run([fake("gateway", "--mode", "stubborn")], stop_timeout=60.0)
    run.wait_for(READY)
    started = time.monotonic()
    run.launcher.request_stop()
    run.launcher.request_stop()
    assert run.join() == 0
    assert time.monotonic() - started < 10


def test_busy_port_fails_before_anything_starts():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        spec = fake("tokenizer")._replace(ports=(port,))
        run = Run([spec])
        assert run.join() == 1
    assert f"port(s) {port} already in use" in run.err.getvalue()
    assert run.launcher.children == {}


def test_log_dir_gets_each_childs_output(tmp_path):
    run = Run([fake("tokenizer")], log_dir=str(tmp_path))
    run.wait_for(READY)
    run.launcher.request_stop()
    assert run.join() == 0
    assert "fake serving on" in (tmp_path / "tokenizer.log").read_text()
    assert "tokenizer |" not in run.out.getvalue()


@pytest.fixture(autouse=True)
def _no_stray_children():
    """Whatever a test does, none of its children outlive it."""
    before = set(os.listdir("/proc"))
    yield
    mine = str(os.getpid())
    for entry in set(os.listdir("/proc")) - before:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            assert not (fields[1] == mine and fields[0] != "Z"), (
                f"child {entry} of the test process left running"
            )
