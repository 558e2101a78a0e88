"""The waiting queue: preempted sequences first (most recently preempted at the very front),
then new ones by (priority, arrival). Lower priority values run earlier; ties go first come,
first served.

Invariant: a sequence is in the queue exactly while its status is WAITING. One that leaves
otherwise (aborted) is `discard`ed and skipped lazily when it reaches the head.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable

from pagedserve.scheduler.request import Sequence, SequenceStatus


class WaitQueue:
    __slots__ = ("_front", "_heap", "_len")

    def __init__(self) -> None:
        self._front: deque[Sequence] = deque()  # re-queued (preempted, executor lost)
        self._heap: list[tuple[int, int, int, Sequence]] = []  # (priority, arrival, choice, seq)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, seq: Sequence) -> None:
        request = seq.request
        heapq.heappush(self._heap, (request.priority, request.arrival, seq.index, seq))
        self._len += 1

    def push_front(self, seq: Sequence) -> None:
        self._front.appendleft(seq)
        self._len += 1

    def extend_front(self, seqs: Iterable[Sequence]) -> None:
        """Put `seqs` at the front, in the order given."""
        seqs = list(seqs)
        self._front.extendleft(reversed(seqs))
        self._len += len(seqs)

    def discard(self, seq: Sequence) -> None:
        """`seq` (WAITING until now) leaves the queue without being popped."""
        self._len -= 1

    def peek(self) -> Sequence | None:
        front, heap = self._front, self._heap
        while front and front[0].status != SequenceStatus.WAITING:
            front.popleft()
        if front:
            return front[0]
        while heap and heap[0][3].status != SequenceStatus.WAITING:
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def pop(self) -> Sequence:
        """Remove and return the head (call `peek` first)."""
        seq = self._front.popleft() if self._front else heapq.heappop(self._heap)[3]
        self._len -= 1
        return seq
