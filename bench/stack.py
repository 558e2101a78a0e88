"""`--launch`: a whole stack started with `pagedserve up` on free ports, stopped after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.redis_harness import free_ports


class StackFailed(RuntimeError):
    """`pagedserve up` exited or was not ready in time."""


@dataclass(frozen=True, slots=True)
class StackConfig:
    model: str
    num_kv_blocks: int
    block_size: int = 16
    max_model_len: int = 512
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    extra_args: tuple[str, ...] = ()  # more `pagedserve up` flags (e.g. --swap-space, --preemption-mode)


@dataclass
class LaunchedStack:
    """`pagedserve up` as a child process group; use as a context manager."""

    config: StackConfig
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pagedserve-bench-")))
    startup_timeout: float = 300.0
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        names = ("http", "grpc", "tokenizer", "scheduler", "executor")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.gateway_address = f"127.0.0.1:{self.ports['grpc']}"
        self.scheduler_address = f"127.0.0.1:{self.ports['scheduler']}"
        self.http_url = f"http://127.0.0.1:{self.ports['http']}"

    def command(self) -> list[str]:
        c = self.config
        cmd = [
            sys.executable, "-m", "pagedserve.cli", "up", "--model", c.model,
            "--block-size", str(c.block_size), "--num-kv-blocks", str(c.num_kv_blocks),
            "--max-model-len", str(c.max_model_len), "--max-num-seqs", str(c.max_num_seqs),
            "--log-dir", str(self.log_dir), "--startup-timeout", str(self.startup_timeout),
        ]  # fmt: skip
        if c.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(c.max_num_batched_tokens)]
        cmd += list(c.extra_args)
        for name, port in self.ports.items():
            cmd += [f"--{name}-port", str(port)]
        return cmd

    def start(self) -> LaunchedStack:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / "up.log", "w")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        deadline = time.monotonic() + self.startup_timeout + 10
        while not health_check(self.gateway_address, timeout=1.0):
            if self.proc.poll() is not None:
                raise StackFailed(f"pagedserve up exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StackFailed(f"pagedserve up not ready in {self.startup_timeout}s:\n{self.log_tail()}")
            time.sleep(0.25)
        return self

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_dir / "up.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM the launcher (it stops every service, gateway first); SIGKILL the group if stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> LaunchedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
