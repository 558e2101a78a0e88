"""A Redis server to talk to, for tests and for `pagedserve up`.

Order of preference: a Docker daemon that answers (testcontainers' redis image), else a
local `redis-server` on a free port with a throwaway directory (Debian's package is
installed first when missing and we are root). Never a fake: the block manager's Lua
scripts must run on a real Redis.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection

log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    """No Redis could be started; the message says what was tried."""


# Ports this process handed out lately. A port is free when picked but is not bound until its
# server starts, and the kernel readily hands a just-released port out again: without this, two
# picks made before either server binds can name the same port.
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=1024)


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    return free_ports(1, host, avoid)[0]


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct ports free now, not in `avoid` (ports promised to servers that have not
    bound yet) and not handed out lately by this process. Each socket stays bound until all are
    picked, so one call cannot name a port twice."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count * 64):
            if len(ports) == count:
                break
            s = stack.enter_context(contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _RECENT_PORTS and port not in avoid:
                ports.append(port)
                _RECENT_PORTS.append(port)
        if len(ports) < count:
            raise OSError(f"found {len(ports)} of {count} free ports on {host}")
        return ports


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker daemon answers (a client alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("redis-server missing: installing Debian's redis-server package")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], env=env, capture_output=True)
        path = shutil.which("redis-server")
        if path:
            return path
    raise RedisUnavailable(
        "no Redis: no Docker daemon answers and `redis-server` is not installed "
        "(install it with `apt-get install redis-server`, or pass --redis-url)"
    )


def _wait_ping(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5)
    while True:
        try:
            if client.ping():
                client.close()
                return
        except redis.exceptions.ConnectionError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RedisUnavailable(f"redis-server exited with code {proc.returncode} during start-up")
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"Redis at {host}:{port} did not answer PING within {timeout}s")
        time.sleep(0.05)


class RedisServer:
    """A throwaway Redis server; use as a context manager or call start()/stop(). `url` is set once started."""

    def __init__(self, prefer_docker: bool | None = None, port: int | None = None) -> None:
        self.prefer_docker = docker_available() if prefer_docker is None else prefer_docker
        self.port = port
        self.url = ""
        self.kind = ""
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._container = None

    def start(self) -> RedisServer:
        if self.prefer_docker:
            try:
                self._start_container()
                return self
            except Exception as exc:  # a daemon that answers `info` can still fail to run
                log.warning("testcontainers Redis failed (%s); falling back to a local redis-server", exc)
        self._start_local()
        return self

    def _start_container(self) -> None:
        from testcontainers.redis import RedisContainer

        self._container = RedisContainer("redis:7-alpine")
        self._container.start()
        host = self._container.get_container_host_ip()
        port = int(self._container.get_exposed_port(6379))
        _wait_ping(host, port, 30)
        self.url, self.kind = f"redis://{host}:{port}/0", "docker"

    def _start_local(self) -> None:
        binary = ensure_redis_server_binary()
        port = self.port or free_port()
        self._dir = tempfile.mkdtemp(prefix="pagedserve-redis-")
        args = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self._dir,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            os.path.join(self._dir, "redis.log"),
        ]
        # Its own session: a terminal's Ctrl-C reaches the launcher, which stops Redis last.
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_ping("127.0.0.1", port, 10, self._proc)
        except RedisUnavailable:
            self.stop()
            raise
        self.url, self.kind, self.port = f"redis://127.0.0.1:{port}/0", "local", port

    def stop(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
