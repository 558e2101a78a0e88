"""Where the executor's CPU work runs: torch's thread count and, optionally, the cores it is pinned to.

Default (no `--cpu-threads`): on a CPU device, one torch thread per core this process may run on,
less one, and at least one. The executor is one of several processes (gateway, tokenizer, scheduler,
Redis) that usually share the machine; a torch thread that shares its core with a busy process stalls
every parallel region at its barrier, so the whole forward waits for it. Leaving one core to the rest
of the stack (vLLM on CPU does the same: its worker is pinned, the API server and engine core get the
other cores) costs at most 1/N of the executor's peak and removes that stall. With `--cpu-affinity`,
the cores named are the executor's own, so the default is one thread per pinned core; `pagedserve
up` pins it so by default on CPU (all cores but the last, the other services on the last: see
launch_plan.default_placement), and its heavy steps then spread over every core (`widen_cores`),
while its other steps share their decode attention and linears with a helper thread on each core
left to the other services (`start_core_helpers`; no barrier, so a busy core costs no stall). On
CUDA the default leaves torch's own choice: the host threads only feed the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from typing import NamedTuple

import torch

from pagedserve.common.cpus import available_cores, format_cpu_list
from pagedserve.kernels import cpu_native

log = logging.getLogger(__name__)


# A step with at least this many tokens is prefill-heavy: it runs long, and while it runs the
# gateway, scheduler and tokenizer have little to do (few tokens are flowing), so the core left to
# them is better used by the executor for its matmuls (2 threads: 1.9x on a 2,048-token step).
PREFILL_STEP_TOKENS = 256


def default_prefill_threads(threads: int, num_cores: int, pinned: bool, device_type: str) -> int:
    """Every core the process may run on, on CPU when not pinned; else the step threads."""
    if device_type != "cpu" or pinned:
        return threads
    return max(threads, num_cores)


class Placement(NamedTuple):
    threads: int
    cores: tuple[int, ...]  # the cores this process may run on afterwards
    pinned: bool  # whether --cpu-affinity pinned them
    why: str  # how the thread count was chosen, for the start-up log
    wide: tuple[int, ...] = ()  # the cores it could run on before pinning


def widen_cores(placement: Placement, prefill_threads: int) -> tuple[int, ...] | None:
    """The cores a heavy step spreads over when --prefill-threads asks for more threads than the
    pinned cores (`pagedserve up`'s default placement: the executor pinned to all cores but one,
    its prefill steps on every core, while the other services have little to do); else None."""
    if not placement.pinned or prefill_threads <= len(placement.cores):
        return None
    return placement.wide if set(placement.wide) > set(placement.cores) else None


def start_team(threads: int) -> list[int]:
    """Starts torch's OpenMP threads for the calling thread at `threads` threads (OpenMP keeps a
    pool of them per thread that opens parallel regions) and returns their thread ids; [] where
    they were not found (they ran before: see below). A new thread starts with its creator's name,
    so the caller takes a name of its own while one parallel op brings its team up, and the team
    is the threads that carry that name."""
    me = threading.get_native_id()
    comm = f"/proc/self/task/{me}/comm"
    try:
        with open(comm) as f:
            name = f.read().strip()
        mark = f"team-{me}"[:15]
        with open(comm, "w") as f:
            f.write(mark)
    except OSError:  # not Linux, or no /proc
        return []
    current = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.zeros(threads << 16).add_(1)  # a parallel op of `threads` grains or more
    finally:
        torch.set_num_threads(current)
        with contextlib.suppress(OSError), open(comm, "w") as f:
            f.write(name)
    team = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
            if int(tid) != me and f.read().strip() == mark:
                team.append(int(tid))
    return sorted(team)


def spread_team(team: list[int], pinned: tuple[int, ...], wide: tuple[int, ...]) -> None:
    """Each thread of a heavy step's team onto a core of its own: the calling thread onto the
    first pinned core, `team`'s threads onto the cores after it (the other pinned cores, then the
    borrowed ones). Every thread allowed on every wide core instead (what `pin_all_threads(wide)`
    does) leaves the team's threads where they were, on the caller's core, until the kernel's load
    balancer moves them: each parallel region then waited for them, up to a scheduler tick (4-8 ms
    for one 2 MB gather, against 0.2-0.5 ms with a core each)."""
    order = [*pinned, *(c for c in wide if c not in pinned)]
    with contextlib.suppress(OSError):
        os.sched_setaffinity(threading.get_native_id(), {order[0]})
    for i, tid in enumerate(team, start=1):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, {order[i % len(order)]})


def pin_all_threads(cores: tuple[int, ...]) -> None:
    """Every thread of this process (torch's pool included) onto `cores`, but the core helpers,
    which stay on their own cores."""
    helpers = cpu_native.helpers()
    keep = set(helpers.tids) if helpers is not None else set()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in keep:
            continue
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)


def start_core_helpers(placement: Placement, wide: tuple[int, ...]) -> None:
    """A helper thread on each core the executor's heavy steps borrow (`wide` less its pinned
    cores), for its one-thread steps' decode attention and linears (logged when they start)."""
    borrowed = tuple(sorted(set(wide) - set(placement.cores)))
    if placement.threads != 1 and borrowed:
        # with several torch threads the forward's own regions already use the pinned cores
        log.info("no core helpers: %d torch threads", placement.threads)
        return
    if cpu_native.start_helpers(borrowed) is not None:
        log.info(
            "core helpers on %s: decode attention and linears of steps under %d tokens shared with "
            "them (%s=0: off)",
            format_cpu_list(borrowed),
            PREFILL_STEP_TOKENS,
            cpu_native.HELPERS_SWITCH,
        )


def default_threads(num_cores: int, pinned: bool) -> int:
    """All pinned cores; else all cores but one, and at least one (see the module docstring)."""
    return num_cores if pinned else max(1, num_cores - 1)


def apply_placement(
    cpu_threads: int | None, cpu_affinity: tuple[int, ...] | None, device_type: str
) -> Placement:
    """Pins the process, every thread it has (when asked), then sets torch's intra-op thread count;
    returns what it chose."""
    pinned = cpu_affinity is not None
    wide = available_cores()
    if pinned:
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("--cpu-affinity: this platform cannot pin a process to cores")
        try:
            os.sched_setaffinity(0, cpu_affinity)
        except OSError as e:
            raise ValueError(f"--cpu-affinity {list(cpu_affinity)}: cannot pin to these cores ({e})") from e
        # and the threads started before (torch's pool, from its import): the call above moved
        # only this one
        pin_all_threads(tuple(cpu_affinity))
    cores = available_cores()
    if cpu_threads is not None:
        threads, why = cpu_threads, "--cpu-threads"
    elif device_type == "cpu":
        threads = default_threads(len(cores), pinned)
        why = (
            "one per pinned core"
            if pinned
            else f"{len(cores)} cores available, one left to the other services"
        )
    else:
        threads, why = torch.get_num_threads(), f"torch's default on {device_type}"
    torch.set_num_threads(threads)
    return Placement(threads, cores, pinned, why, wide)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap and are reused, instead of a fresh mmap each.
KEEP_ALLOCATIONS_BELOW = 1 << 30


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed blocks for reuse instead of handing large ones back to
    the kernel; whether it could (glibc only). A forward allocates activations of several MB per
    op; by default many are fresh mmaps, page-faulted in as they are first written and unmapped at
    free (glibc raises its mmap threshold as large blocks are freed, so how many varies from step
    to step), and a prefill step spends a large share of its elementwise ops taking page faults (the
    reason vLLM's CPU docs preload tcmalloc). Kept in the heap, the next step reuses the same pages:
    a 2,048-token prefill step ran 10-20% faster (docs/EXECUTOR_BENCH.md), bit for bit the same.
    The executor's resident memory stays at its peak instead of shrinking between steps."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_ALLOCATIONS_BELOW)) and bool(
        mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    )
