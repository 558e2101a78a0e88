"""`pagedserve up` as a real process: Redis and every service that exists come up healthy,
Ctrl-C stops them all, a service that fails at start-up is reported, one that is killed
once ready is restarted (Redis too, on its port) unless `--no-restart` — and no process is
ever left behind, even when the launcher itself is SIGKILLed.

"Left behind" is checked two ways, both by scanning /proc. Every process the launcher
starts inherits a marker in its environment: services and anything they start themselves,
whatever process group or parent they end up with. And every descendant of the launcher
seen while it serves is checked by (pid, start time) afterwards: that covers redis-server,
which overwrites its environment with its process title.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.redis_harness import free_ports
from pagedserve.launch_plan import LauncherConfig, module_available, plan
from pagedserve.launcher import READY

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
    """Start `pagedserve up`; afterwards SIGKILL whatever a failed test left, by pid: the
    launcher (whose children, Redis included, then get SIGTERM from the kernel) and every
    marked process."""
    runs: list[Up] = []

    def start(*argv: str) -> Up:
        up = Up(list(argv), f"PAGEDSERVE_TEST_MARKER={uuid.uuid4().hex}")
        runs.append(up)
        return up

    yield start
    for up in runs:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
        for pid in marked_processes(up.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def port_flags() -> tuple[list[str], LauncherConfig]:
    names = ("http", "grpc", "tokenizer", "scheduler", "executor")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
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

    redis_url, redis_pid = re.search(r"^\s+redis\s+(\S+) \(pid (\d+)\)", out, re.M).groups()
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
    assert sorted(started) == sorted(["redis", *(spec.name for spec in expected)]), out

    below = descendants(up.proc.pid)
    # redis-server overwrites its environment (its process title), so it carries no marker.
    services = {pid for name, pid in started.items() if name != "redis"}
    assert services <= set(marked_processes(up.marker)) & {pid for pid, _ in below}
    assert comm(int(redis_pid)) == "redis-server" and int(redis_pid) in {pid for pid, _ in below}, out

    up.proc.send_signal(signal.SIGINT)
    assert up.wait(60) == 0, up.output()
    out = up.output()
    assert out.index("stopping gateway") < out.index("stopping redis"), out
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


def start_small_stack(launch, model: str, *flags: str) -> tuple[Up, str]:
    """`pagedserve up` with a small pool on free ports, ready; returns it and its HTTP URL."""
    argv, config = port_flags()
    up = launch("--model", model, *argv, "--num-kv-blocks", "64", "--max-model-len", "128",
                "--startup-timeout", str(STARTUP_TIMEOUT), "--stop-timeout", "10", *flags)  # fmt: skip
    up.wait_for(READY, STARTUP_TIMEOUT + 30)
    return up, f"http://127.0.0.1:{config.http_port}"


def complete(http_url: str, timeout: float = 60.0) -> httpx.Response:
    body = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}  # the served model
    return httpx.post(f"{http_url}/v1/completions", json=body, timeout=timeout)


def restarted_pid(up: Up, name: str, old: int, timeout: float = 60.0) -> int:
    """Wait for the launcher to report `name` restarted and serving again; its new pid."""
    up.wait_for(f"pagedserve up: restarted {name} (pid ", timeout)
    new = int(re.search(rf"restarted {name} \(pid (\d+)", up.output())[1])
    assert new != old
    up.wait_for(f"pagedserve up: {name} is serving again at ", timeout)
    return new


@pytest.fixture
def full_stack():
    for service in ("executor", "tokenizer", "scheduler", "gateway"):
        if not module_available(service):
            pytest.skip(f"the {service} does not exist yet")


def test_up_restarts_a_killed_executor_and_dies_with_its_children(launch, up_model, full_stack):
    up, http_url = start_small_stack(launch, up_model)
    assert complete(http_url).status_code == 200
    old = up.started_pids()["executor"]
    os.kill(old, signal.SIGKILL)

    new = restarted_pid(up, "executor", old)
    out = up.output()
    assert "executor was killed by SIGKILL while serving; restarting it in 0.5s" in out, out
    assert "lines of executor's stderr:" in out, out
    assert httpx.get(f"{http_url}/health", timeout=10).status_code == 200
    # The scheduler sees the new executor's epoch and serves on its fresh pool.
    reply = complete(http_url)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 8

    # SIGKILLed, the launcher cannot stop its children: the kernel SIGTERMs each (PDEATHSIG).
    below = descendants(up.proc.pid)
    assert new in {pid for pid, _ in below}
    up.proc.kill()
    up.wait(10)
    assert_nothing_left(up, below, timeout=30)


def test_up_restarts_its_killed_redis_on_the_same_port(launch, up_model, full_stack):
    """Redis dies under a running stream: the launcher restarts it (empty, same port), the
    scheduler serves on from its own view — the stream ends with the undisturbed text — then
    takes its lease again and rewrites the pool, which fsck finds consistent."""
    from pagedserve.scheduler.fsck import fsck

    up, http_url = start_small_stack(launch, up_model)
    redis_url = re.search(r"^\s+redis\s+(\S+) \(pid", up.output(), re.M)[1]
    client = redis.Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    client.set("pagedserve-test-key", "before")
    body = {"prompt": "def add(a, b):", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    undisturbed = httpx.post(f"{http_url}/v1/completions", json=body, timeout=120).json()["choices"][0][
        "text"
    ]
    old = up.started_pids()["redis"]

    text = ""
    with httpx.stream(
        "POST", f"{http_url}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += "".join(c["text"] for c in event["choices"])
            if old is not None:
                os.kill(old, signal.SIGKILL)
                old_pid, old = old, None
    assert text == undisturbed

    restarted_pid(up, "redis", old_pid)
    assert "redis was killed by SIGKILL while serving; restarting it in 0.5s" in up.output()
    assert client.get("pagedserve-test-key") is None  # a new, empty Redis on the same URL
    deadline = time.monotonic() + 30
    while not (metas := [m for m in client.keys("pagedserve:*:meta") if client.hexists(m, "num_blocks")]):
        assert time.monotonic() < deadline, "the scheduler did not rewrite its pool into the new Redis"
        time.sleep(0.2)
    pool_id = metas[0][len("pagedserve:{") : -len("}:meta")]
    assert fsck(client, pool_id) == []
    client.close()
    reply = complete(http_url)
    assert reply.status_code == 200, reply.text

    up.proc.send_signal(signal.SIGINT)
    assert up.wait(60) == 0, up.output()
    assert_nothing_left(up)


def test_up_restarts_a_killed_scheduler_and_streams_resume(launch, up_model, full_stack):
    """kill -9 the scheduler under 8 running streams: the launcher restarts it, the new one
    takes the pool over from Redis, the gateway re-attaches every stream, and each text equals
    its undisturbed run's."""
    import asyncio

    up, http_url = start_small_stack(launch, up_model)
    prompts = [
        "def add(a, b):",
        "class A:",
        "import os",
        "for i in x:",
        "x = [",
        "if a:",
        "while b:",
        "y = {",
    ]
    body = {"max_tokens": 60, "temperature": 0, "ignore_eos": True}
    undisturbed = [
        httpx.post(f"{http_url}/v1/completions", json={"prompt": p, **body}, timeout=120).json()["choices"][
            0
        ]["text"]
        for p in prompts
    ]
    old = up.started_pids()["scheduler"]
    started: set[int] = set()

    async def stream(client: httpx.AsyncClient, i: int) -> str:
        text = ""
        async with client.stream(
            "POST", "/v1/completions", json={"prompt": prompts[i], "stream": True, **body}
        ) as reply:
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += "".join(c["text"] for c in event["choices"])
                started.add(i)
                if len(started) == len(prompts) and old in up.started_pids().values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old, signal.SIGKILL)
        return text

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=http_url, timeout=120) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(len(prompts))))

    texts = asyncio.run(run())
    assert texts == undisturbed
    restarted_pid(up, "scheduler", old)
    assert "scheduler was killed by SIGKILL while serving" in up.output()
    up.proc.send_signal(signal.SIGINT)
    assert up.wait(60) == 0, up.output()
    assert_nothing_left(up)


def test_up_with_no_restart_stops_when_a_service_dies(launch, up_model, full_stack):
    up, _ = start_small_stack(launch, up_model, "--no-restart")
    below = descendants(up.proc.pid)
    os.kill(up.started_pids()["tokenizer"], signal.SIGKILL)
    assert up.wait(60) == 1, up.output()
    out = up.output()
    assert "tokenizer was killed by SIGKILL while serving; stopping the rest (--no-restart)" in out, out
    assert "restarted" not in out
    assert_nothing_left(up, below)
