"""`pagedserve up` as a real process: Redis and every service that exists come up healthy,
Ctrl-C stops them all, a service that fails at start-up is reported — and no process is
ever left behind.

"Left behind" is checked two ways, both by scanning /proc. Every process the launcher
starts inherits a marker in its environment: services and anything they start themselves,
whatever process group or parent they end up with. And every descendant of the launcher
seen while it serves is checked by (pid, start time) afterwards: that covers redis-server,
which overwrites its environment with its process title.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.redis_harness import free_port
from pagedserve.launcher import READY, LauncherConfig, module_available, plan

STARTUP_TIMEOUT = 240


def marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds `marker`."""
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read; a zombie's environ reads as empty
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state is [0], ppid [1], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live process below `root`."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat(int(entry))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def still_running(processes: set[tuple[int, str]]) -> list[int]:
    return [
        pid for pid, start in processes if (fields := stat(pid)) and fields[0] != "Z" and fields[19] == start
    ]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class Up:
    """A `pagedserve up` process, its stdout and stderr collected line by line."""

    def __init__(self, argv: list[str], marker: str) -> None:
        self.marker = marker
        env = {**os.environ, "PAGEDSERVE_TEST_MARKER": marker.split("=", 1)[1]}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "up", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # a test's Ctrl-C is the test's SIGINT below, nothing else
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(text) for line in self.lines):
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(
                    f"`pagedserve up` exited with {self.proc.returncode} before {text!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`pagedserve up` still running after {timeout}s:\n{self.output()}")
        self._reader.join(5)
        return code

    def started_pids(self) -> dict[str, int]:
        return {m[1]: int(m[2]) for m in re.finditer(r"started (\w+) \(pid (\d+)", self.output())}


def assert_nothing_left(up: Up, seen: set[tuple[int, str]] = frozenset(), timeout: float = 5.0) -> None:
    """SIGKILLed processes take a moment to go; a marked or `seen` process alive after
    `timeout` is a leak."""
    deadline = time.monotonic() + timeout
    while (left := {*marked_processes(up.marker), *still_running(seen)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind: {[(pid, comm(pid)) for pid in left]}\n{up.output()}"


@pytest.fixture
def launch():
    """Start `pagedserve up`; afterwards SIGKILL whatever a failed test left, by pid."""
    runs: list[Up] = []

    def start(*argv: str) -> Up:
        up = Up(list(argv), f"PAGEDSERVE_TEST_MARKER={uuid.uuid4().hex}")
        runs.append(up)
        return up

    yield start
    for up in runs:
        for pid in marked_processes(up.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def port_flags() -> tuple[list[str], LauncherConfig]:
    ports = {name: free_port() for name in ("http", "grpc", "tokenizer", "scheduler", "executor")}
    argv = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    config = LauncherConfig(model="", **{f"{name}_port": port for name, port in ports.items()})
    return argv, config


def test_up_serves_then_sigint_stops_everything(launch, up_model):
    argv, config = port_flags()
    # A small pool and context: the executor sizes nothing from the machine's memory.
    up = launch("--model", up_model, *argv, "--num-kv-blocks", "64", "--max-model-len", "128",
                "--startup-timeout", str(STARTUP_TIMEOUT), "--stop-timeout", "10")  # fmt: skip
    up.wait_for(READY, STARTUP_TIMEOUT + 30)
    out = up.output()

    redis_url, redis_kind = re.search(r"^\s+redis\s+(\S+) \((\w+)\)", out, re.M).groups()
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    client.close()

    expected = [spec for spec in plan(config, redis_url).specs]
    if module_available("tokenizer"):
        assert "tokenizer" in [spec.name for spec in expected]
    for spec in expected:
        assert health_check(spec.health_address, timeout=5.0), f"{spec.name} not SERVING:\n{out}"
        assert f"{spec.name} is serving at {spec.health_address}" in out
    started = up.started_pids()
    assert sorted(started) == sorted(spec.name for spec in expected), out

    below = descendants(up.proc.pid)
    assert set(started.values()) <= set(marked_processes(up.marker)) & {pid for pid, _ in below}
    if redis_kind == "local":
        assert "redis-server" in {comm(pid) for pid, _ in below}, out

    up.proc.send_signal(signal.SIGINT)
    assert up.wait(60) == 0, up.output()
    assert "stopping Redis" in up.output()
    assert_nothing_left(up, below)


def test_up_reports_a_service_failing_at_startup(launch, tmp_path):
    if not (module_available("tokenizer") or module_available("executor")):
        pytest.skip("no service that loads a model (tokenizer, executor) exists yet")
    argv, _ = port_flags()
    up = launch("--model", str(tmp_path / "no-such-model"), *argv, "--startup-timeout", str(STARTUP_TIMEOUT))
    assert up.wait(STARTUP_TIMEOUT + 30) == 1, up.output()
    out = up.output()
    failed = re.search(r"(tokenizer|executor) exited with code (\d+) during start-up", out)
    assert failed and failed[2] != "0", out
    tail = out.split(f"lines of {failed[1]}'s stderr:", 1)
    assert len(tail) == 2 and "no-such-model" in tail[1], out
    assert READY not in out
    assert_nothing_left(up)
