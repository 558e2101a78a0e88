#!/usr/bin/env bash
# Everything pagedserve checks and measures on a CUDA GPU, in one run from the repository root:
#   1. the decode-step figures of a 1B-class random-weight Llama in bf16 (bench/midsize.py
#      --llama-1b): CUDA graphs, --enforce-eager and transformers, at batch 1, 32 and 256 with
#      128-token contexts, and at batch 1 to 256 with 1,024-token contexts;
#   2. the Triton kernels, compiled, at real model shapes against their references, and the decode
#      attention's bandwidth (bench/gpu_check.py);
#   3. the executor's token-identity tests with every engine on the GPU (Triton kernels, CUDA
#      graphs; PAGEDSERVE_TEST_DEVICE=cuda), then the torch.compile'd one.
# Each stage has its own time limit and log, so one that fails or hangs leaves the others' results.
# Logs and the reports go to $OUT (default /tmp/pagedserve-gpu). It needs torch with CUDA, triton,
# transformers and pytest, and nothing else of the project's dependencies: the package is put on
# the path from this checkout (no install).
set -u
OUT=${OUT:-/tmp/pagedserve-gpu}
MODEL=${MODEL:-/tmp/pagedserve-llama-1b}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

# `pagedserve` is services/, with kernels/ and bench/ as its subpackages (pyproject's package-dir)
site=$(mktemp -d)
mkdir "$site/pagedserve"
for f in services/*; do ln -s "$PWD/$f" "$site/pagedserve/"; done
ln -s "$PWD/kernels" "$PWD/bench" "$site/pagedserve/"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s (limit $limit)"
}

{ nvidia-smi -L; $PY --version; $PY -c 'import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)'; } >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
stage model 120 $PY -m pagedserve.bench.midsize --llama-1b "$MODEL"
stage decode 240 $PY -m pagedserve.bench.executor_bench --model "$MODEL" --dtype bfloat16 \
    --backends triton triton-eager transformers --batch-sizes 1 32 256 --prompt-len 128 --decode-steps 20
stage decode-long 240 $PY -m pagedserve.bench.executor_bench --model "$MODEL" --dtype bfloat16 \
    --backends triton triton-eager transformers --batch-sizes 1 8 32 256 --prompt-len 1024 --decode-steps 20
stage kernels 180 $PY -m pagedserve.bench.gpu_check --out "$OUT/kernels.md"
PAGEDSERVE_TEST_DEVICE=cuda stage identity 180 $PY -m pytest -q -p no:cacheprovider --timeout 170 \
    tests/executor/test_token_identity.py tests/executor/test_decode_graphs.py -k "not compiled"
PAGEDSERVE_TEST_DEVICE=cuda stage compiled 240 $PY -m pytest -q -p no:cacheprovider --timeout 230 \
    tests/executor/test_token_identity.py -k compiled

for name in decode decode-long kernels identity compiled; do
    echo "==== $name"
    grep -v "Loading weights" "$OUT/$name.log" | tail -n 45
done
