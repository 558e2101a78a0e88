"""The executor's one frozen config, built from flags in `server.py` and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.common.models import default_model

DEFAULT_PORT = 50054
DEFAULT_BLOCK_SIZE = 16
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Without --num-kv-blocks or --kv-cache-memory, a CPU pool gets this many bytes.
DEFAULT_CPU_KV_CACHE_MEMORY = 512 * 1024 * 1024
# The default max_model_len is the model's max_position_embeddings, but no more than this.
DEFAULT_MAX_MODEL_LEN_CAP = 8192
# The default token budget per step is max(max_model_len, this).
DEFAULT_MIN_BATCHED_TOKENS = 8192
# Without --max-num-batched-tokens, a CPU executor warms up with a step this long (the scheduler's
# default token budget per step): see ExecutorEngine.warm_up.
WARM_UP_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    model: str = ""  # local path or hub id; "" means default_model()
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None  # wins over every other sizing
    kv_cache_memory: int | None = None  # bytes for the pool
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # CUDA, when neither above is given
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped
    max_num_batched_tokens: int | None = None  # None: max(max_model_len, DEFAULT_MIN_BATCHED_TOKENS)
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    attention_backend: str | None = None  # None: triton on CUDA, torch elsewhere
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    cpu_threads: int | None = None  # torch intra-op threads; None: see placement.default_threads
    cpu_affinity: tuple[int, ...] | None = None  # cores to pin the process to; None: not pinned
    # torch threads for a prefill-heavy step (placement.PREFILL_STEP_TOKENS or more tokens); None: see
    # placement.default_prefill_threads (every core the process may run on)
    prefill_threads: int | None = None
    compile: bool = False  # torch.compile the forward (start-up pays the compile; see model_runner)
    # CUDA only: no CUDA graphs of decode steps (and no torch.compile even with `compile`)
    enforce_eager: bool = False
    swap_space: float | None = None  # GiB of CPU blocks; None: 4 on CUDA (capped), 0 on CPU (swap_space.py)

    @property
    def model_path(self) -> str:
        return self.model or default_model()

    def validate(self) -> None:
        """Raise ValueError naming the first flag out of range."""
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"--num-kv-blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"--kv-cache-memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.swap_space is not None and self.swap_space < 0:
            raise ValueError(f"--swap-space must be >= 0 GiB, got {self.swap_space}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be >= 1, got {self.cpu_threads}")
        if self.prefill_threads is not None and self.prefill_threads < 1:
            raise ValueError(f"--prefill-threads must be >= 1, got {self.prefill_threads}")
        if self.cpu_affinity is not None and (not self.cpu_affinity or min(self.cpu_affinity) < 0):
            raise ValueError(f"--cpu-affinity must name core ids >= 0, got {list(self.cpu_affinity)}")
