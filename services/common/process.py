"""Child processes that can be stopped with nothing left behind.

Each child runs in a session of its own, so in a process group of its own: a Ctrl-C at
the terminal reaches only the parent, which then stops its children in the order it
chooses, and a signal sent to the group also reaches whatever the child started itself
(worker processes, compilers). Stopping is SIGTERM to the group, a grace period, then
SIGKILL to the group — after the child has exited too, for members that outlived it.

A child can also be asked to die with its parent (Linux): the kernel sends it a signal
when the thread that started it exits, so a parent that is SIGKILLed, and so cannot stop
its children, leaves none behind.

Output is read line by line by two threads per child and written with the child's name in
front to the parent's stdout/stderr, or to one log file per child; the last lines of
stderr are kept for error reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

# One lock for every line written to the terminal, so that lines of different children
# (and the parent's own messages) never interleave mid-line.
TERMINAL_LOCK = threading.Lock()

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Loaded in the parent, and prctl's arguments built there too, so that the Python run in a
# forked child before exec (a preexec_fn, which a threaded parent should keep tiny) is one
# foreign call and two system calls.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def write_line(stream: TextIO, line: str) -> None:
    """Write one whole line under TERMINAL_LOCK; a closed or broken stream is ignored."""
    with TERMINAL_LOCK:
        with contextlib.suppress(OSError, ValueError):
            stream.write(line + "\n")
            stream.flush()


def signal_name(returncode: int) -> str:
    """'exited with code 3' or 'was killed by SIGKILL' for a Popen returncode."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


class ChildProcess:
    """One child command in its own process group, its output pumped line by line.

    `start()` runs it; `stop(grace)` ends it and every process of its group; `close()`
    joins the output threads. `stderr_tail()` is the last `tail_lines` lines of stderr.

    With `parent_death_signal` (Linux only; ignored elsewhere) the kernel sends the child
    that signal when the *thread* that called `start()` exits, whatever the reason — so
    start such children from a thread that lives as long as they should (the main thread).
    Only the child itself gets it, not what it started: it is its job to stop those.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        prefix: str | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        tail_lines: int = 40,
        parent_death_signal: int | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = env
        self.log_path = log_path
        self.prefix = f"{name} | " if prefix is None else prefix
        self._out = out
        self._err = err
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.parent_death_signal = parent_death_signal
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> ChildProcess:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")  # closed in close()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # own session and process group: pgid == pid
            preexec_fn=self._preexec(),
        )
        for stream, is_err in ((self.proc.stdout, False), (self.proc.stderr, True)):
            thread = threading.Thread(
                target=self._pump, args=(stream, is_err), name=f"{self.name}-{'err' if is_err else 'out'}"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        return self

    def _preexec(self) -> Callable[[], None] | None:
        """What the forked child runs before exec: ask to die with this thread, if asked to."""
        sig = self.parent_death_signal
        if sig is None or _LIBC is None:
            return None
        prctl, parent = _LIBC.prctl, os.getpid()
        args = (
            ctypes.c_int(PR_SET_PDEATHSIG),
            ctypes.c_ulong(sig),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )

        def die_with_parent() -> None:
            prctl(*args)
            # The parent may have died between fork and prctl: no signal would come then.
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)

        return die_with_parent

    def _pump(self, stream: IO[bytes], is_err: bool) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                # A progress bar redraws itself with \r: keep only its last state.
                line = raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1]
                if is_err:
                    self._tail.append(line)
                self._emit(line, is_err)

    def _emit(self, line: str, is_err: bool) -> None:
        if self._log is not None:
            with self._log_lock, contextlib.suppress(OSError, ValueError):
                self._log.write(line + "\n")
                self._log.flush()
            return
        target = self._err if is_err else self._out
        if target is not None:
            write_line(target, self.prefix + line)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stderr_tail(self, wait: float = 2.0) -> list[str]:
        """The last lines of stderr; waits up to `wait` s for the reader to reach the end
        (a grandchild that keeps the pipe open can hold it longer)."""
        if self.poll() is not None and len(self._threads) == 2:
            self._threads[1].join(wait)
        return list(self._tail)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to every process of the child's group; a group already gone is fine."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def group_alive(self) -> bool:
        """True while any process of the child's group exists (a zombie not yet reaped counts)."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def reap(self, timeout: float) -> bool:
        """After the child has exited: SIGKILL what is left of its group, wait up to
        `timeout` s for the group to be gone, and join the output threads. False if some
        member was still there (a zombie whose new parent does not reap it, say)."""
        assert self.proc is not None and self.proc.poll() is not None, "the child is still running"
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        gone = not self.group_alive()
        self.close()
        return gone

    def stop(self, grace: float) -> int | None:
        """SIGTERM the group, wait up to `grace` s, SIGKILL the group; returns the exit code."""
        stop_all([self], grace)
        return self.poll()

    def close(self, wait: float = 2.0) -> None:
        for thread in self._threads:
            thread.join(wait)
        if self._log is not None:
            with self._log_lock:
                self._log.close()
            self._log = None


def stop_all(children: Iterable[ChildProcess], grace: float, hurry: threading.Event | None = None) -> None:
    """Stop `children` together: SIGTERM to each group, wait until all have exited (at most
    `grace` s, less once `hurry` is set), SIGKILL the groups of those still running, reap
    them, then SIGKILL each group once more for members that outlived their leader."""
    started = [c for c in children if c.proc is not None]
    for child in started:
        if child.poll() is None:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(c.poll() is None for c in started):
        if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            break
        time.sleep(0.05)
    for child in started:
        if child.poll() is None:
            child.signal_group(signal.SIGKILL)
        assert child.proc is not None
        child.proc.wait()
        # The leader is reaped, but members of its group (a worker it started, a process
        # that ignores SIGTERM) may live on; the group id stays theirs until they are gone.
        child.signal_group(signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a child that died is started again: `backoff` s after its death, doubling with
    each restart within the last `window` s, at most `max_backoff`; and at most
    `max_restarts` restarts within `window` s (past that, the caller gives up)."""

    max_restarts: int = 5
    window: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window <= 0 or not 0 <= self.backoff <= self.max_backoff:
            raise ValueError(
                f"a restart policy needs max_restarts >= 0, window > 0, 0 <= backoff <= max: {self}"
            )


class RestartHistory:
    """One child's restarts under a RestartPolicy: `schedule(now)` records one and says how
    long to wait before it, or None when the limit within the window is reached."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._times: deque[float] = deque()  # monotonic times of restarts within the window

    def recent(self, now: float) -> int:
        """Restarts within the window that ends at `now`."""
        while self._times and now - self._times[0] >= self.policy.window:
            self._times.popleft()
        return len(self._times)

    def schedule(self, now: float) -> float | None:
        count = self.recent(now)
        if count >= self.policy.max_restarts:
            return None
        self._times.append(now)
        return min(self.policy.backoff * 2**count, self.policy.max_backoff)
