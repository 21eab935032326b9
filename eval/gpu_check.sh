#!/usr/bin/env bash
# Issue 6 on a lent GPU, in about 5 minutes (at most 9 min 40 s): correctness of every fast path, then the timings.
#   bash eval/gpu_check.sh            (from the repo root; results under $OUT or out/bench)
# Needs only what the GPU image has (torch with CUDA, triton); flash-attn rows appear when it is
# installed. Each step has its own time limit and writes its own JSON, so a step that runs out
# of time leaves the others' results; rerun only that step. See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-out/bench}"
PY="$(command -v python3 || command -v python)"
mkdir -p "$DIR"
status=0
step() {  # step <seconds> <name> <eval.bench args...>
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$PY" -m eval.bench --out "$DIR" "$@" 2>&1 | tee "$DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# 1. the fast paths auto picks (sdpa, flash, triton) and chunked vs math, bf16, forward and
#    gradients; the first call of each Triton kernel compiles and autotunes (about a minute).
#    flex, the fallback, compiles slowly per shape: check it alone when there is time left,
#    python -m eval.bench --check-only --backends flex
step 120 check --check-only --backends sdpa flash triton chunked
# 2. attention kernels alone at T 1024/4096/8192 (flex left out: compiling it per shape is slow;
#    DESIGN.md has its numbers), ratios to SDPA softmax
step 140 kernels --skip train nanogpt --backends sdpa flash triton chunked math
# 3. sinklab softmax vs nanoGPT, GPT-2-124M shapes, T=1024 B=16, bf16, compiled (issue 6 target)
step 180 nanogpt --skip kernels --kinds softmax --gates none --lengths 1024 --compile
# 4. training step of every kind and gate at every T (sigmoid / elu1 / linear through Triton)
step 140 train --skip kernels nanogpt --gates none elementwise --train-backend triton
exit $status
