"""A deterministic stand-in executor for policy tests (tests only; integration tests use the real one).

It validates every step with the real executor's `plan_step` (so protocol mistakes fail as
they would there), and it keeps a toy KV pool: each slot remembers the (position, token) that
was written to it. Before computing a sequence's tokens it checks that every earlier slot its
block table maps holds exactly that sequence's tokens, so a wrong prefix-cache hit, a missing
copy-on-write or a stale block table fails the test instead of passing silently. Its swap space
(`num_cpu_blocks`) holds toy slots too: a swap-out or swap-in moves them, so a swap mapping that
puts the wrong KV back is caught by the same check.

The "model" picks the next token as a hash of all tokens so far and the sequence's seed, so
greedy outputs are a pure function of the prompt, and `reference()` computes them directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from array import array

from pagedserve.common.errors import FailedPrecondition, Fenced
from pagedserve.common.step import ExecutorInfo, SampledToken, StepInput, StepOutput
from pagedserve.executor.step_plan import RequestState, plan_step

EOS = 2


def next_token(token_ids: list[int], seed: int | None, vocab_size: int, low: int = 3) -> int:
    h = hashlib.blake2b(array("q", token_ids).tobytes() + str(seed).encode(), digest_size=8)
    return low + int.from_bytes(h.digest(), "little") % (vocab_size - low)


def reference(prompt: list[int], max_tokens: int, vocab_size: int, seed: int | None = None) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, seed, vocab_size))
    return tokens[len(prompt) :]


class KVMismatch(AssertionError):
    pass


class FakeExecutor:
    """Implements `ExecutorClient`; `steps` records every StepInput it ran."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 1000,
        max_model_len: int = 4096,
        num_cpu_blocks: int = 0,
    ) -> None:
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.steps: list[StepInput] = []
        self.restart_before_step: int | None = None  # restart when this many steps have run
        self.step_delay = 0.0  # seconds each step takes (a model forward)
        self._one_at_a_time: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None  # per loop
        self.arrived: list[float] = []  # when each step call came (steps run in that order) ...
        self.finished: list[float] = []  # ... and when it ended
        self.restart()

    def restart(self) -> None:
        """A new process: new epoch, empty pool, no request state."""
        self.epoch = uuid.uuid4().hex
        self.requests: dict[str, RequestState] = {}
        self.max_fence = 0  # as the real executor: the highest fencing token seen
        self.slots: list[tuple[int, int] | None] = [None] * (self.num_blocks * self.block_size)
        self.cpu_slots: list[tuple[int, int] | None] = [None] * (self.num_cpu_blocks * self.block_size)

    async def info(self) -> ExecutorInfo:
        return ExecutorInfo(
            model="fake",
            architecture="Fake",
            dtype="float32",
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            epoch=self.epoch,
            eos_token_ids=(EOS,),
            attention_backend="none",
            device="cpu",
            num_cpu_blocks=self.num_cpu_blocks,
        )

    async def execute_step(self, step: StepInput) -> StepOutput:
        # One step at a time, in the order they came, as the real executor runs them (the
        # scheduler may send a step while the one before it still runs).
        self.arrived.append(time.monotonic())
        loop = asyncio.get_running_loop()
        if self._one_at_a_time is None or self._one_at_a_time[0] is not loop:
            self._one_at_a_time = (loop, asyncio.Lock())
        async with self._one_at_a_time[1]:
            try:
                return await self._execute_step(step)
            finally:
                self.finished.append(time.monotonic())

    async def _execute_step(self, step: StepInput) -> StepOutput:
        if self.restart_before_step is not None and len(self.steps) == self.restart_before_step:
            self.restart_before_step = None
            self.restart()
        if step.fence:
            if step.fence < self.max_fence:
                raise Fenced(f"fenced: step {step.step_id} carries token {step.fence} < {self.max_fence}")
            self.max_fence = step.fence
        if step.epoch and step.epoch != self.epoch:
            raise FailedPrecondition(f"epoch {step.epoch} is not {self.epoch}")
        if step.forget_all:
            self.requests.clear()
        plan = plan_step(
            step,
            self.requests,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=1 << 30,
            num_cpu_blocks=self.num_cpu_blocks,
        )
        self.steps.append(step)
        if self.step_delay:
            await asyncio.sleep(self.step_delay)
        bs = self.block_size
        for gpu, cpu in plan.swap_out:
            self.cpu_slots[cpu * bs : (cpu + 1) * bs] = self.slots[gpu * bs : (gpu + 1) * bs]
        for cpu, gpu in plan.swap_in:
            self.slots[gpu * bs : (gpu + 1) * bs] = self.cpu_slots[cpu * bs : (cpu + 1) * bs]
        for src, dst in plan.block_copies:
            self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]
        sampled = []
        # As the real forward does in each layer: every scheduled token's K/V is written before
        # any sequence attends, so a sequence may read blocks another one fills in the same step.
        for s in plan.scheduled:
            state = s.state
            for pos in range(state.num_computed_tokens, state.num_computed_tokens + s.num_tokens):
                self.slots[s.block_ids[pos // bs] * bs + pos % bs] = (pos, state.token_ids[pos])
        for s in plan.scheduled:
            state = s.state
            start, end = state.num_computed_tokens, state.num_computed_tokens + s.num_tokens
            for pos in range(start):  # the context this forward attends to
                slot = s.block_ids[pos // bs] * bs + pos % bs
                if self.slots[slot] != (pos, state.token_ids[pos]):
                    raise KVMismatch(
                        f"{state.request_id}: position {pos} reads {self.slots[slot]} from slot {slot}, "
                        f"expected {(pos, state.token_ids[pos])}"
                    )
            if s.samples:
                token = next_token(state.token_ids[:end], state.sampling.seed, self.vocab_size)
                sampled.append(SampledToken(state.request_id, token))
        for request_id in plan.forget:
            del self.requests[request_id]
        for s in plan.scheduled:
            self.requests[s.state.request_id] = s.state
            s.state.block_ids = s.block_ids
            s.state.num_computed_tokens += s.num_tokens
        for token in sampled:
            state = self.requests[token.request_id]
            state.token_ids.append(token.token_id)
            state.output_token_ids.append(token.token_id)
        return StepOutput(self.epoch, sampled)

    async def close(self) -> None:
        return None
