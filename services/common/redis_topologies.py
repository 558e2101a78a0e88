"""Redis beyond one plain node, started locally for tests: a password-protected or TLS node, a
Redis Cluster of N masters, a master watched by a Sentinel. Each is real `redis-server`
processes in a throwaway directory (see `redis_harness` for the single plain node), and
gives the URL that `redis_connect` takes.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pagedserve.common.redis_harness import (
    RedisUnavailable,
    ensure_redis_server_binary,
    free_port,
    free_ports,
)


def _cli(port: int, *args: str, password: str | None = None, tls: tuple[str, str, str] | None = None,
         timeout: float = 10.0) -> str:  # fmt: skip
    command = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    if password:
        command += ["--no-auth-warning", "-a", password]
    if tls:
        command += ["--tls", "--cacert", tls[0], "--cert", tls[1], "--key", tls[2]]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)
    return done.stdout + done.stderr


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, Redis' rule) exists and is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RedisUnavailable("no free port pair (port, port + 10000) for a cluster node")


class RedisNodes:
    """Local `redis-server` processes sharing one throwaway directory; stopped together."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pagedserve-redis-"))
        self.procs: list[subprocess.Popen] = []
        self.binary = ensure_redis_server_binary()

    def spawn(self, name: str, *args: str, config: str | None = None) -> subprocess.Popen:
        """A `redis-server` (with `config` as its config file's text, first, when given)."""
        work = self.dir / name
        work.mkdir()
        command = [self.binary]
        if config is not None:
            (work / "redis.conf").write_text(config)
            command.append(str(work / "redis.conf"))
        command += ["--bind", "127.0.0.1", "--dir", str(work), "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--loglevel", "warning", "--logfile", str(work / "redis.log"), *args]  # fmt: skip
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.dir / name / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def wait(self, what: str, ready, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RedisUnavailable(
                        f"a redis-server exited with code {proc.returncode} while waiting for {what}"
                    )
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"{what} not ready within {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalRedis(RedisNodes):
    """One node with a password (`requirepass`) and/or TLS only (`tls`: CA, cert, key; the
    plain port is then closed). `url` is set once started."""

    def __init__(self, password: str | None = None, tls: tuple[str, str, str] | None = None) -> None:
        super().__init__()
        self.password, self.tls = password, tls
        self.port = free_port()
        self.url = ""

    def start(self) -> LocalRedis:
        args = []
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            ca, cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-ca-cert-file", ca, "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-auth-clients", "optional"]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        self.spawn("node", *args)
        try:
            self.wait(
                "redis-server",
                lambda: "PONG" in _cli(self.port, "PING", password=self.password, tls=self.tls),
            )
        except RedisUnavailable:
            self.stop()
            raise
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        query = f"?ssl_ca_certs={self.tls[0]}" if self.tls else ""
        self.url = f"{scheme}://{auth}127.0.0.1:{self.port}/0{query}"
        return self

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalRedisCluster(RedisNodes):
    """A Redis Cluster of `masters` nodes (no replicas), slots spread by `redis-cli --cluster
    create`; with a password, and TLS only (`tls`: CA, cert, key; the cluster bus too) when given."""

    def __init__(
        self, masters: int = 3, password: str | None = None, tls: tuple[str, str, str] | None = None
    ) -> None:
        super().__init__()
        self.ports = [_cluster_port() for _ in range(masters)]
        self.password, self.tls = password, tls
        self.url = ""

    def _cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        return _cli(port, *args, password=self.password, tls=self.tls, timeout=timeout)

    def start(self) -> LocalRedisCluster:
        try:
            for port in self.ports:
                auth = (
                    ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
                )
                listen = ["--port", str(port)]
                if self.tls:
                    listen = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
                              "--tls-ca-cert-file", self.tls[0], "--tls-cert-file", self.tls[1],
                              "--tls-key-file", self.tls[2], "--tls-auth-clients", "optional"]  # fmt: skip
                self.spawn(f"node-{port}", *listen, "--cluster-enabled", "yes",
                           "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
                           "--cluster-node-timeout", "2000", *auth)  # fmt: skip
            for port in self.ports:
                self.wait(f"node {port}", lambda p=port: "PONG" in self._cli(p, "PING"))
            created = self._cli(self.ports[0], "--cluster", "create",
                                *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0", "--cluster-yes",
                                timeout=60)  # fmt: skip
            if "All 16384 slots covered" not in created:
                raise RedisUnavailable(f"redis-cli --cluster create failed:\n{created[-2000:]}")
            for port in self.ports:
                self.wait(
                    f"cluster_state:ok at {port}",
                    lambda p=port: "cluster_state:ok" in self._cli(p, "CLUSTER", "INFO"),
                )
        except BaseException:
            self.stop()
            raise
        auth = f":{self.password}@" if self.password else ""
        scheme, query = (
            ("rediss+cluster", f"?ssl_ca_certs={self.tls[0]}") if self.tls else ("redis+cluster", "")
        )
        self.url = f"{scheme}://{auth}" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + query
        return self

    def node_keys(self) -> dict[int, list[str]]:
        """Each node's keys (node port -> keys), read from each node alone."""
        return {p: [k for k in self._cli(p, "--scan").splitlines() if k] for p in self.ports}

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalRedisSentinel(RedisNodes):
    """A master and one Sentinel that monitors it as `service_name` (quorum 1)."""

    def __init__(self, service_name: str = "pagedserve", password: str | None = None) -> None:
        super().__init__()
        self.service_name, self.password = service_name, password
        self.master_port, self.sentinel_port = free_ports(2)
        self.url = ""

    def start(self) -> LocalRedisSentinel:
        try:
            self.spawn("master", "--port", str(self.master_port),
                       *(["--requirepass", self.password] if self.password else []))  # fmt: skip
            self.wait("master", lambda: "PONG" in _cli(self.master_port, "PING", password=self.password))
            config = (
                f"port {self.sentinel_port}\n"
                f"sentinel monitor {self.service_name} 127.0.0.1 {self.master_port} 1\n"
                f"sentinel down-after-milliseconds {self.service_name} 5000\n"
            )
            if self.password:
                config += f"sentinel auth-pass {self.service_name} {self.password}\n"
            self.spawn("sentinel", "--sentinel", config=config)
            want = str(self.master_port)
            self.wait(
                "sentinel",
                lambda: (
                    want in _cli(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", self.service_name)
                ),
            )
        except BaseException:
            self.stop()
            raise
        auth = f":{self.password}@" if self.password else ""
        self.url = f"redis+sentinel://{auth}127.0.0.1:{self.sentinel_port}/{self.service_name}/0"
        return self

    def __enter__(self) -> LocalRedisSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
