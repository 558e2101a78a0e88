"""The executor's core: per-request state between steps, and one `execute_step` per forward.

A step is applied as one transaction. `plan_step` checks all of it against the current state and
builds what the forward needs without changing anything; a malformed step raises `InvalidArgument`
(an epoch mismatch `FailedPrecondition`) and leaves the pool and every request state as they were.
Only then are the block copies made, the forward run and the tokens sampled; the request states are
committed last, so a forward that fails for another reason (out of memory) leaves them untouched too.

Order within a step, as the protocol states: swap-outs (device -> CPU) first, then swap-ins
(CPU -> device), then block copies; forget ids are dropped, then new requests join, then cached
ones advance. Swap-outs come first because the device blocks they read may be handed out again in
the same step (as swap-in or copy destinations, or for new tokens). A sequence samples exactly when its scheduled
tokens reach the end of its known tokens (see `pagedserve.common.step`), and the sampled token is
appended to its tokens. A beam-search sequence (`num_beam_candidates` > 0) also returns its
best next tokens by log-probability; the scheduler picks the beams from those and sends each
chosen continuation as a new sequence, so the token appended here is never computed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pagedserve.common.cpus import format_cpu_list
from pagedserve.common.errors import FailedPrecondition
from pagedserve.common.step import ExecutorInfo, PromptLogprobs, SampledToken, StepInput, StepOutput
from pagedserve.executor import kv_pool, sampler
from pagedserve.executor.config import (
    DEFAULT_CPU_KV_CACHE_MEMORY,
    DEFAULT_MAX_MODEL_LEN_CAP,
    DEFAULT_MIN_BATCHED_TOKENS,
    WARM_UP_TOKENS,
    ExecutorConfig,
)
from pagedserve.executor.cuda_graphs import DecodeGraphs
from pagedserve.executor.grammar import Matcher, StructuredOutputs
from pagedserve.executor.inputs import ScheduledSeq
from pagedserve.executor.kv_pool import KVPool
from pagedserve.executor.model_runner import ModelRunner
from pagedserve.executor.placement import (
    PREFILL_STEP_TOKENS,
    apply_placement,
    default_prefill_threads,
    pin_all_threads,
    spread_team,
    start_core_helpers,
    start_team,
    widen_cores,
)
from pagedserve.executor.prompt_logprobs import gather_prompt_logprobs, plan_prompt_rows
from pagedserve.executor.step_plan import RequestState, StepPlan, plan_step
from pagedserve.executor.swap_space import SwapSpace, num_cpu_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_model_len: int
    max_num_batched_tokens: int


class ExecutorEngine:
    """Holds the model runner, the KV pool and every request's state; thread-safe (one step at a time)."""

    def __init__(
        self, runner: ModelRunner, pool: KVPool, limits: EngineLimits, num_cpu_blocks: int = 0
    ) -> None:
        self.runner = runner
        self.pool = pool
        self.limits = limits
        self.swap = SwapSpace(pool, num_cpu_blocks)
        self.epoch = uuid.uuid4().hex  # a new pool: the scheduler must recompute whatever it placed before
        self.max_fence = 0  # the highest fencing token a step carried (see execute_step)
        self.requests: dict[str, RequestState] = {}
        # Grammar matchers of the constrained requests; the tokenizer is read from the model's folder.
        self.structured = StructuredOutputs(runner.name, runner.vocab_size, runner.eos_token_ids)
        self._lock = threading.Lock()
        # torch threads for ordinary steps (as placed: set before the model loaded) and for
        # prefill-heavy ones (see placement.PREFILL_STEP_TOKENS; from_config sets them)
        self.step_threads = torch.get_num_threads()
        self.prefill_threads = self.step_threads
        # (pinned cores, every core) when heavy steps leave the pinned cores (placement.widen_cores)
        self.widen: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._teams: dict[int, list[int]] = {}  # a heavy step's calling thread -> its OpenMP team
        self.warm_up_tokens = 0  # the start-up warm-up step's length (0: none; from_config sets it)

    @classmethod
    def from_config(cls, config: ExecutorConfig) -> ExecutorEngine:
        """Loads the model, sizes and allocates the pool, and self-checks the attention."""
        config.validate()
        torch.manual_seed(config.seed)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Before the model loads, so that loading already runs on the chosen cores and threads.
        placement = apply_placement(config.cpu_threads, config.cpu_affinity, device.type)
        log.info(
            "%d torch threads (%s); %s cores %s",
            placement.threads,
            placement.why,
            "pinned to" if placement.pinned else "may run on",
            format_cpu_list(placement.cores),
        )
        prefill_threads = config.prefill_threads or default_prefill_threads(
            placement.threads, len(placement.cores), placement.pinned, device.type
        )
        wide = widen_cores(placement, prefill_threads)
        if wide is not None:
            # also before the model loads: its linears are packed in slices for the helpers
            start_core_helpers(placement, wide)
        runner = ModelRunner.load(
            config.model_path, dtype=config.dtype, device=device, attention_backend=config.attention_backend
        )
        limits = resolve_limits(runner, config.max_model_len, config.max_num_batched_tokens)
        if config.compile and not config.enforce_eager:
            seconds = runner.compile(config.block_size)
            log.info("compiled the forward (torch.compile, inductor) in %.1f s", seconds)
        # After compiling, so that the compiled forward is what is checked against the dense one.
        runner.self_check(config.block_size)
        spec = runner.kv_cache_spec(config.block_size)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_memory is not None:
            num_blocks = kv_pool.num_blocks_from_memory(spec, config.kv_cache_memory)
        elif device.type == "cuda":
            peak = runner.profile_peak_memory(
                limits.max_num_batched_tokens, limits.max_model_len, config.block_size
            )
            total = torch.cuda.mem_get_info(device)[1]
            num_blocks = kv_pool.num_blocks_from_gpu_utilization(
                spec, total, peak, config.gpu_memory_utilization
            )
            log.info(
                "profiled peak memory %s at %d tokens",
                kv_pool.format_bytes(peak),
                limits.max_num_batched_tokens,
            )
        else:
            num_blocks = kv_pool.num_blocks_from_memory(spec, DEFAULT_CPU_KV_CACHE_MEMORY)
        kv_pool.check_fits(spec, num_blocks, limits.max_model_len)
        pool = KVPool(spec, num_blocks, device)
        log.info(
            "model %s (%s, %s) on %s with the %s attention backend, %s",
            runner.name,
            runner.architecture,
            str(runner.dtype).removeprefix("torch."),
            device,
            runner.backend.name,
            runner.lean.describe() if runner.lean is not None else "transformers' forward",
        )
        log.info(pool.describe(limits.max_model_len))
        if device.type == "cuda" and runner.backend.name == "triton" and not config.enforce_eager:
            graphs = DecodeGraphs(runner, pool, limits.max_num_batched_tokens, limits.max_model_len)
            try:
                seconds = graphs.capture()
            except Exception as exc:  # e.g. a forward that reads a tensor on the host mid-step
                log.warning(
                    "CUDA graphs of decode steps could not be captured (%s: %s); decode steps run eagerly",
                    type(exc).__name__,
                    exc,
                )
            else:
                runner.decode_graphs = graphs
                log.info(
                    "captured CUDA graphs of decode steps for %d batch sizes (1-%d) in %.1f s "
                    "(--enforce-eager: none)",
                    len(graphs.sizes),
                    graphs.sizes[-1],
                    seconds,
                )
        engine = cls(runner, pool, limits, num_cpu_blocks(spec, config.swap_space, device))
        engine.prefill_threads = prefill_threads
        if wide is not None:
            engine.widen = (placement.cores, wide)
        if engine.prefill_threads != engine.step_threads:
            log.info(
                "%d torch threads for steps of %d+ tokens%s (--prefill-threads)",
                engine.prefill_threads,
                PREFILL_STEP_TOKENS,
                f", on cores {format_cpu_list(wide)}" if wide else "",
            )
        if device.type == "cpu" and runner.backend.name == "torch":  # Triton on CPU: an interpreter
            engine.warm_up_tokens = config.max_num_batched_tokens or min(
                limits.max_num_batched_tokens, WARM_UP_TOKENS
            )
        engine.structured.warm_up_in_background()
        return engine

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(
            model=self.runner.name,
            architecture=self.runner.architecture,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            vocab_size=self.runner.vocab_size,
            max_model_len=self.limits.max_model_len,
            num_blocks=self.pool.num_blocks,
            block_size=self.pool.block_size,
            epoch=self.epoch,
            eos_token_ids=self.runner.eos_token_ids,
            attention_backend=self.runner.backend.name,
            device=str(self.runner.device),
            num_cpu_blocks=self.swap.num_blocks,
        )

    def execute_step(self, step: StepInput, claimed_total_tokens: int | None = None) -> StepOutput:
        """Runs one step; `claimed_total_tokens` is the sender's total_num_scheduled_tokens, when it sent one."""
        with self._lock:
            start = time.perf_counter()
            if step.fence:
                if step.fence < self.max_fence:
                    raise FailedPrecondition(
                        f"fenced: step {step.step_id} carries fencing token {step.fence}, but a scheduler "
                        f"with token {self.max_fence} drives this executor now"
                    )
                self.max_fence = step.fence
            if step.epoch and step.epoch != self.epoch:
                raise FailedPrecondition(
                    f"step {step.step_id}: epoch {step.epoch!r} is not this executor's epoch {self.epoch!r} "
                    "(the executor restarted and its KV pool is gone; recompute running requests)"
                )
            # forget_all (a new scheduler: what the one before it left here is stale): the step
            # is checked as if nothing were held, and everything held is dropped when it commits.
            plan = plan_step(
                step,
                {} if step.forget_all else self.requests,
                num_blocks=self.pool.num_blocks,
                block_size=self.pool.block_size,
                vocab_size=self.runner.vocab_size,
                max_model_len=self.limits.max_model_len,
                max_num_batched_tokens=self.limits.max_num_batched_tokens,
                claimed_total_tokens=claimed_total_tokens,
                num_cpu_blocks=self.swap.num_blocks,
            )
            if step.forget_all:
                plan.forget = list(self.requests)
            started = self._start_matchers(plan)
            sampled, prompt_logprobs = self._run(plan, started)
            self._commit(plan, sampled, started)
            return StepOutput(
                epoch=self.epoch,
                sampled=sampled,
                execute_seconds=time.perf_counter() - start,
                prompt_logprobs=prompt_logprobs,
            )

    def _start_matchers(self, plan: StepPlan) -> dict[str, Matcher]:
        """Fresh matchers (output replayed) for the constrained requests this step (re)starts."""
        return {
            s.state.request_id: self.structured.start(
                s.state.request_id, s.state.sampling, s.state.output_token_ids
            )
            for s in plan.scheduled
            if s.state.sampling.constrained and self.requests.get(s.state.request_id) is not s.state
        }

    def _run(
        self, plan: StepPlan, started: dict[str, Matcher]
    ) -> tuple[list[SampledToken], list[PromptLogprobs]]:
        self.swap.swap_out(plan.swap_out)
        self.swap.swap_in(plan.swap_in)
        if plan.block_copies:
            mapping = torch.tensor(plan.block_copies, dtype=torch.int64, device=self.pool.device)  # [n, 2]
            self.runner.backend.copy_blocks(self.pool.k_caches, self.pool.v_caches, mapping)
        if not plan.scheduled:
            return [], []
        seqs = [
            ScheduledSeq(s.state.token_ids, s.block_ids, s.state.num_computed_tokens, s.num_tokens, s.samples)
            for s in plan.scheduled
        ]
        prompt_indices, prompt_rows = plan_prompt_rows(plan.scheduled)
        with self._threads_for(sum(s.num_tokens for s in plan.scheduled)):
            logits = self.runner.execute(seqs, self.pool, prompt_indices)  # [N + E, V]
        sampling = [s.state for s in plan.scheduled if s.samples]
        prompt_logprobs = gather_prompt_logprobs(logits[len(sampling) :], prompt_rows) if prompt_rows else []
        return self._sample(logits[: len(sampling)], sampling, started), prompt_logprobs

    @contextlib.contextmanager
    def _threads_for(self, num_tokens: int) -> Iterator[None]:
        """Runs a forward of `num_tokens` tokens on the step threads, or, from PREFILL_STEP_TOKENS
        up, on the prefill threads (spread over the wider cores where placement widens)."""
        threads = self.prefill_threads if num_tokens >= PREFILL_STEP_TOKENS else self.step_threads
        widen = self.widen if threads != self.step_threads else None
        if widen is not None:
            master = threading.get_native_id()
            if master not in self._teams:
                self._teams[master] = start_team(threads)
            if self._teams[master]:
                spread_team(self._teams[master], *widen)
            else:  # a team started before: every thread allowed on every core
                pin_all_threads(widen[1])
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if threads != self.step_threads:
                torch.set_num_threads(self.step_threads)
            if widen is not None:
                pin_all_threads(widen[0])

    def warm_up(self, num_tokens: int) -> float:
        """Runs a step of `num_tokens` prompt tokens (`ModelRunner.largest_step`, a throw-away pool)
        on the threads a real one gets; returns the seconds it took. A fresh process's first heavy
        step pays for its memory as it first touches it: on CPU a 2,048-token step of the bundled
        model took 2-3x its later time, page-faulting in tens of MB of activations, and that step
        gives a burst's first requests their first token. Kept by the allocator afterwards (see
        placement.keep_freed_memory), the pages are warm for the first real one."""
        start = time.perf_counter()
        pool, seqs = self.runner.largest_step(num_tokens, self.limits.max_model_len, self.pool.block_size)
        with self._lock, self._threads_for(num_tokens):
            self.runner.execute(seqs, pool)
        return time.perf_counter() - start

    def _sample(
        self, logits: torch.Tensor, sampling: list[RequestState], started: dict[str, Matcher]
    ) -> list[SampledToken]:
        if not sampling:
            return []
        mask = None
        if any(r.sampling.constrained for r in sampling):
            held = self.structured.matchers
            mask = self.structured.fill(
                [
                    started.get(r.request_id) or held.get(r.request_id) if r.sampling.constrained else None
                    for r in sampling
                ]
            )
        results = sampler.sample(
            logits,
            [r.sampling for r in sampling],
            [r.prompt_token_ids for r in sampling],
            [r.output_token_ids for r in sampling],
            self.runner.eos_token_ids,
            mask=mask,
        )
        out = [
            SampledToken(r.request_id, token_id, logprobs)
            for r, (token_id, logprobs) in zip(sampling, results, strict=True)
        ]
        beam_rows = [i for i, r in enumerate(sampling) if r.num_beam_candidates]
        if beam_rows:
            counts = [sampling[i].num_beam_candidates for i in beam_rows]
            for i, candidates in zip(
                beam_rows, sampler.beam_candidates(logits, beam_rows, counts), strict=True
            ):
                out[i].beam_candidates = candidates
        return out

    def _commit(self, plan: StepPlan, sampled: list[SampledToken], started: dict[str, Matcher]) -> None:
        if started or self.structured.matchers:
            self.structured.commit(
                plan.forget,
                list(started.values()),
                {t.request_id: t.token_id for t in sampled},
            )
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


def resolve_limits(
    runner: ModelRunner, max_model_len: int | None, max_num_batched_tokens: int | None
) -> EngineLimits:
    """max_model_len defaults to the model's max_position_embeddings (capped) and may not exceed it,
    nor the model's sliding window, which the kernels do not implement: below it the window never bites."""
    model_max = runner.max_position_embeddings
    window = runner.sliding_window
    if max_model_len is None:
        max_model_len = min(x for x in (model_max, window, DEFAULT_MAX_MODEL_LEN_CAP) if x is not None)
    if model_max is not None and max_model_len > model_max:
        raise ValueError(
            f"--max-model-len={max_model_len} exceeds the model's max_position_embeddings={model_max}"
        )
    if window is not None and max_model_len > window:
        raise ValueError(
            f"--max-model-len={max_model_len} exceeds the model's sliding window of {window} tokens; "
            "pagedserve's kernels do not implement sliding-window attention, so max_model_len must be "
            f"<= {window} (where the window never applies)"
        )
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(max_model_len, DEFAULT_MIN_BATCHED_TOKENS)
    return EngineLimits(max_model_len, max_num_batched_tokens)
