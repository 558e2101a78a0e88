"""`pagedserve up`: Redis and every service as local processes, started and stopped together.

Start order follows the dependencies: the executor and the tokenizer, then the scheduler
(which needs the executor and Redis), then the gateway (which needs the tokenizer and the
scheduler). A tier must report SERVING on the standard gRPC health service before the next
one starts. A service whose module is not there is skipped, and so is every service that
needs it; the launcher says which, so `up` works with whatever part of the stack exists.

Redis is a child like the others (a local `redis-server` on a free port, started first and
stopped last) unless `--redis-url` names one; with no `redis-server` installed, the Redis of
`redis_harness` (Docker) is used, and that one is not supervised. Secrets (a Redis password,
`--api-key`) reach the services in their environment, never on a command line.

A child that exits during start-up fails the start-up: the launcher prints its name, how it
exited and the last lines of its stderr, stops the rest and exits 1. Once the stack is
ready, a child that exits is reported the same way and started again with the same
command — Redis on the same port, empty — after a backoff (`RestartPolicy`: 0.5 s doubling
to 10 s); past `--max-restarts` restarts of one child within `--restart-window` seconds, or
with `--no-restart`, the launcher stops everything and exits 1 instead. The old process is
reaped, and its process group gone, before the new one starts. The scheduler notices a new
executor by its epoch, and the services reconnect to whatever they lost.

SIGINT, SIGTERM or SIGHUP stop every child — SIGTERM to its process group, SIGKILL after
`--stop-timeout` — gateway first, Redis last; a second Ctrl-C skips the wait. Children are
started with PR_SET_PDEATHSIG (Linux), so that a launcher that is SIGKILLed leaves no child
running: the kernel sends each one SIGTERM. Every child is started on the thread that runs
`serve` (the main thread in `pagedserve up`), since that signal follows the starting thread.

Exit status: 0 when stopped by a signal once ready; 1 when a service failed or was not SERVING
in time, or died more often than allowed; 128 + the signal when stopped during start-up; 2 for
bad flags.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from pagedserve.common import internal_tls
from pagedserve.common.certs import make_certs
from pagedserve.common.process import ChildProcess, RestartHistory, signal_name, stop_all, write_line
from pagedserve.common.redis_connect import off_the_command_line, redact
from pagedserve.common.redis_harness import (
    RedisServer,
    RedisUnavailable,
    ensure_redis_server_binary,
    free_port,
)
from pagedserve.launch_args import add_arguments as add_arguments  # `pagedserve up`'s flags (cli.py)
from pagedserve.launch_checks import given_redis_problem, is_ready, ports_in_use
from pagedserve.launch_plan import (
    LauncherConfig,
    ServiceSpec,
    cuda_available,
    default_placement,
    hostport,
    plan,
    redis_spec,
    service_env,
    service_ports,
)

READY = "pagedserve up: ready"
WATCH_INTERVAL = 0.25  # seconds between looks at the children once the stack is ready
REAP_TIMEOUT = 5.0  # seconds a dead child's process group gets to be gone before a restart


class Launcher:
    """Runs a plan's services as child processes; `request_stop` (from a signal handler
    or another thread) ends `serve`/`run`, which always stop every child before returning."""

    def __init__(
        self, config: LauncherConfig, *, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.children: dict[str, tuple[ServiceSpec, ChildProcess]] = {}
        self.stop_signal = 0
        self.child_env: dict[str, str] = {}  # added to every service's environment
        # Supervision, once ready: each child's restarts, when each dead one starts again,
        # and the restarted ones that have not answered their probe yet.
        self._restarts: dict[str, RestartHistory] = {}
        self._restart_due: dict[str, float] = {}
        self._not_ready_again: set[str] = set()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._launched = time.monotonic()

    def say(self, message: str, *, error: bool = False) -> None:
        write_line(self.err if error else self.out, f"pagedserve up: {message}")

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """First call: stop cleanly. Second call: stop without waiting for the grace period."""
        if self._stop.is_set():
            self._hurry.set()
            return
        self.stop_signal = signum
        self._stop.set()

    def run(self) -> int:
        """Make the internal certificates when asked, then `run_stack`."""
        if not self.config.internal_tls:
            if self.config.internal_tls_cert:
                c = self.config
                internal_tls.configure(
                    internal_tls.load(c.internal_tls_cert, c.internal_tls_key, c.internal_tls_ca)
                )
            return self.run_stack()
        cert_dir = tempfile.mkdtemp(prefix="pagedserve-tls-")
        try:
            names = tuple(
                dict.fromkeys(("localhost", "127.0.0.1", self.config.connect_host, socket.gethostname()))
            )
            files = make_certs(cert_dir, names)
            self.say(f"internal mutual TLS: a throwaway CA and certificate in {cert_dir}")
            self.config = replace(self.config, internal_tls=False, internal_tls_cert=files.cert,
                                  internal_tls_key=files.key, internal_tls_ca=files.ca)  # fmt: skip
            internal_tls.configure(internal_tls.load(files.cert, files.key, files.ca))
            return self.run_stack()
        finally:
            shutil.rmtree(cert_dir, ignore_errors=True)

    def run_stack(self) -> int:
        """Start Redis (unless a URL was given) and the planned services; wait; stop all."""
        redis_url = self.config.redis_url
        if redis_url is not None:
            problem = given_redis_problem(redis_url)
            if problem:
                self.say(problem, error=True)
                return 1
            # a password goes to the services in their environment, not on their command lines
            arg, self.child_env = off_the_command_line(redis_url)
            specs, skipped = plan(self.config, arg)
            return self.serve(
                specs, skipped, extra_endpoints=[("redis", f"{redact(redis_url)} (given with --redis-url)")]
            )
        try:
            binary = ensure_redis_server_binary()
        except RedisUnavailable:
            return self._run_with_harness_redis()
        data_dir = tempfile.mkdtemp(prefix="pagedserve-redis-")
        try:
            # not a port of the services': they bind theirs only after Redis is up
            redis = redis_spec(binary, free_port(avoid=service_ports(self.config)), data_dir)
            specs, skipped = plan(self.config, f"redis://{redis.health_address}/0")
            return self.serve([redis, *specs], skipped)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)

    def _run_with_harness_redis(self) -> int:
        """No `redis-server` here: Redis in Docker, if a daemon answers; not supervised."""
        self.say("no redis-server installed: starting Redis with Docker (not restarted if it dies)")
        try:
            redis = RedisServer().start()
        except RedisUnavailable as exc:
            self.say(f"cannot start Redis: {exc}", error=True)
            return 1
        try:
            specs, skipped = plan(self.config, redis.url)
            return self.serve(specs, skipped, extra_endpoints=[("redis", f"{redis.url} ({redis.kind})")])
        finally:
            self.say("stopping Redis")
            redis.stop()

    def serve(
        self,
        specs: list[ServiceSpec],
        skipped: dict[str, str] | None = None,
        extra_endpoints: list[tuple[str, str]] | None = None,
    ) -> int:
        """Start `specs` tier by tier, print the endpoints once all are SERVING, and wait
        for a stop request or a child's exit. Every child is stopped before this returns."""
        for name, why in (skipped or {}).items():
            self.say(f"skipping {name}: {why}")
        try:
            code = self._start(specs, self._launched + self.config.startup_timeout)
            if code is not None:
                return code
            self._print_endpoints(specs, skipped or {}, extra_endpoints or [])
            self.say(f"ready in {time.monotonic() - self._launched:.1f}s; Ctrl-C stops everything")
            return self._watch()
        finally:
            self._stop_children()

    def _start(self, specs: list[ServiceSpec], deadline: float) -> int | None:
        """Spawn each tier and wait for it; None once all serve, else the exit status."""
        busy = ports_in_use(self.config.host, [p for spec in specs for p in spec.ports])
        if busy:
            self.say(f"port(s) {', '.join(map(str, busy))} already in use on {self.config.host}", error=True)
            return 1
        for tier in sorted({spec.tier for spec in specs}):
            members = [spec for spec in specs if spec.tier == tier]
            if not self._stop.is_set():
                for spec in members:
                    self._spawn(spec)
            code = self._wait_serving(members, deadline)
            if code is not None:
                return code
        return None

    def _wait_serving(self, pending: list[ServiceSpec], deadline: float) -> int | None:
        pending = list(pending)
        while True:
            if self._stop.is_set():
                self.say("interrupted during start-up; stopping")
                return 128 + self.stop_signal
            if self._report_exited(during="during start-up"):
                return 1
            for spec in [s for s in pending if is_ready(s)]:
                pid = self.children[spec.name][1].pid
                self.say(f"{spec.name} is serving at {spec.health_address} (pid {pid})")
                pending.remove(spec)
            if not pending:
                return None
            if time.monotonic() > deadline:
                for spec in pending:
                    self.say(
                        f"{spec.name} did not report SERVING at {spec.health_address} "
                        f"within --startup-timeout {self.config.startup_timeout:g}s",
                        error=True,
                    )
                    self._print_tail(spec.name)
                return 1
            self._stop.wait(0.25)

    def _spawn(self, spec: ServiceSpec, *, again: bool = False) -> None:
        log_path = Path(self.config.log_dir) / f"{spec.name}.log" if self.config.log_dir else None
        width = max(len(name) for name in ("executor", "tokenizer", "scheduler", "gateway"))
        child = ChildProcess(
            spec.name,
            spec.command,
            env={**os.environ, **self.child_env, **service_env(self.config, spec.name)},
            log_path=log_path,
            prefix=f"{spec.name:<{width}} | ",
            out=self.out,
            err=self.err,
            parent_death_signal=signal.SIGTERM,
        ).start()
        self.children[spec.name] = (spec, child)
        self._place(spec, child.pid)
        where = f", log {log_path}" if log_path else ""
        self.say(f"{'restarted' if again else 'started'} {spec.name} (pid {child.pid}{where})")

    def _place(self, spec: ServiceSpec, pid: int) -> None:
        """With --cpu-affinity the executor has its cores (it pins itself); every other
        service (Redis too) is pinned to the cores left, so none competes with the forward."""
        if not self.config.cpu_affinity or spec.name.split("-")[0] == "executor":
            return
        from pagedserve.common.cpus import available_cores, parse_cpu_list

        rest = sorted(set(available_cores()) - set(parse_cpu_list(self.config.cpu_affinity)))
        if rest:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, rest)

    def _report_exited(self, during: str) -> bool:
        """If a child has exited, say which, how, and its last stderr lines; True if one had."""
        for name, (_, child) in self.children.items():
            code = child.poll()
            if code is not None:
                self.say(f"{name} {signal_name(code)} {during}; stopping the rest", error=True)
                self._print_tail(name)
                return True
        return False

    def _print_tail(self, name: str) -> None:
        tail = self.children[name][1].stderr_tail()
        if not tail:
            self.say(f"{name} wrote nothing to stderr", error=True)
            return
        self.say(f"last {len(tail)} lines of {name}'s stderr:", error=True)
        for line in tail:
            write_line(self.err, f"    {line}")

    def _print_endpoints(
        self, specs: list[ServiceSpec], skipped: dict[str, str], extra: list[tuple[str, str]]
    ) -> None:
        near = self.config.connect_host
        rows = []
        if "gateway" in self.children:
            rows.append(("HTTP", f"http://{hostport(near, self.config.http_port)}"))
            rows.append(("gRPC", hostport(near, self.config.grpc_port)))
        for spec in specs:
            where = f"redis://{spec.health_address}/0" if spec.probe == "redis" else spec.health_address
            rows.append((spec.name, f"{where} (pid {self.children[spec.name][1].pid})"))
        rows.extend(extra)
        for name, why in skipped.items():
            rows.append((name, f"skipped: {why}"))
        if self.config.log_dir:
            rows.append(("logs", self.config.log_dir))
        self.say("endpoints")
        for label, value in rows:
            write_line(self.out, f"    {label:<10} {value}")

    def _watch(self) -> int:
        """Until a stop request: restart children that die (or, with --no-restart, return 1
        at the first death), each after its backoff; report restarted ones serving again."""
        while not self._stop.wait(WATCH_INTERVAL):
            for name, (spec, child) in list(self.children.items()):
                if name in self._restart_due:
                    if time.monotonic() >= self._restart_due[name]:
                        del self._restart_due[name]
                        self._not_ready_again.add(name)
                        self._spawn(spec, again=True)
                elif (code := child.poll()) is not None:
                    if not self._schedule_restart(name, child, code):
                        return 1
                elif name in self._not_ready_again and is_ready(spec):
                    self._not_ready_again.discard(name)
                    self.say(f"{name} is serving again at {spec.health_address} (pid {child.pid})")
        return 0

    def _schedule_restart(self, name: str, child: ChildProcess, code: int) -> bool:
        """Report a child's death and set when it starts again; False to give up instead."""
        how = f"{name} {signal_name(code)}"
        how += " before serving again" if name in self._not_ready_again else " while serving"
        if not self.config.restart:
            self.say(f"{how}; stopping the rest (--no-restart)", error=True)
            self._print_tail(name)
            return False
        history = self._restarts.setdefault(name, RestartHistory(self.config.restart_policy))
        now = time.monotonic()
        delay = history.schedule(now)
        if delay is None:
            policy = history.policy
            self.say(
                f"{how}; it was restarted {policy.max_restarts} times within {policy.window:g}s "
                f"(--max-restarts {policy.max_restarts}, --restart-window {policy.window:g}); "
                "stopping everything",
                error=True,
            )
            self._print_tail(name)
            return False
        self.say(
            f"{how}; restarting it in {delay:g}s "
            f"(restart {history.recent(now)} of at most {history.policy.max_restarts} "
            f"within {history.policy.window:g}s)",
            error=True,
        )
        self._print_tail(name)
        # No double start: the old leader is reaped (poll), and what it started is gone too,
        # before the new one may bind the same ports.
        if not child.reap(REAP_TIMEOUT):
            self.say(f"some process of {name}'s group is still there after {REAP_TIMEOUT:g}s", error=True)
        self._restart_due[name] = now + delay
        return True

    def _stop_children(self) -> None:
        if not self.children:
            return
        # Reverse start order, a tier at a time: the gateway stops taking requests before
        # the scheduler and executor it relies on go away.
        for tier in sorted({spec.tier for spec, _ in self.children.values()}, reverse=True):
            members = [(spec, child) for spec, child in self.children.values() if spec.tier == tier]
            running = [spec.name for spec, child in members if child.poll() is None]
            if running:
                self.say(f"stopping {', '.join(running)}")
            stop_all([child for _, child in members], self.config.stop_timeout, self._hurry)
        for _, child in self.children.values():
            child.close()


def main(args: argparse.Namespace) -> int:
    try:
        config = LauncherConfig.from_args(args)
    except ValueError as exc:
        print(f"pagedserve up: {exc}", file=sys.stderr)
        return 2
    from pagedserve.common.cpus import available_cores

    config, placed = default_placement(config, available_cores(), cuda_available)
    launcher = Launcher(config)
    if placed:
        launcher.say(placed)
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: launcher.request_stop(signum)) for sig in stop_signals
    }
    try:
        return launcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
