"""The executor: model weights, the paged KV pool, the kernels and the sampler, behind one gRPC service.

config.py        ExecutorConfig, the frozen flags
kv_pool.py       KVPool: per-layer k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; sizing
attention.py     the attention function registered with transformers (reshape_and_cache + paged_attention)
inputs.py        packing a step's scheduled tokens into one flat batch
model_runner.py  ModelRunner: loads an HF causal LM, probes its layers, runs a forward, returns logits
step_plan.py     RequestState and plan_step: the whole step validated before anything changes
engine.py        ExecutorEngine: execute_step (plan, copy blocks, forward, sample, commit), info
sampler.py       sample(): penalties, temperature, top-k/top-p/min-p, seeds, logprobs
servicer.py      the thin async gRPC servicer; server.py the `pagedserve executor` entry point
client.py        GrpcExecutorClient and InProcessExecutorClient (common.step.ExecutorClient)
"""

from __future__ import annotations
