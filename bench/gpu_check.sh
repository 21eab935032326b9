#!/usr/bin/env bash
# GPU check in about 6 minutes (each step has its own limit; at most 10 min in all):
# correctness of every fast attention path, then the timings.
#   bash bench/gpu_check.sh            (from the repo root; results under $OUT or out/bench)
# Needs torch with CUDA and triton; flash-attn rows appear when it is installed. Each step
# writes its own log (and JSON), so a step that runs out of time leaves the others' results;
# rerun only that step. What the numbers are compared against: docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-out/bench}"
PY="$(command -v python3 || command -v python)"
mkdir -p "$DIR"
status=0
run_step() {  # run_step <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}
bench() { run_step "$1" "$2" "$PY" -m bench --out "$DIR" "${@:3}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# 1. correctness: the gpu-marked tests (every fast path vs math in bf16, forward and gradients;
#    whole models auto vs math, compiled vs eager; linear kernel memory flat in T). The first
#    call of each Triton kernel compiles and autotunes (about a minute).
run_step 200 check "$PY" -m pytest -q -m gpu tests/test_kernels.py
# 2. attention kernels alone at T 1024/4096/8192 (flex left out: compiling it per shape is slow;
#    docs/design.md has its numbers), ratios to SDPA softmax
bench 140 kernels --skip train nanogpt --backends sdpa flash triton chunked math
# 3. sinklab softmax vs nanoGPT, GPT-2-124M shapes, T=1024 B=16, bf16, compiled
bench 120 nanogpt --skip kernels --kinds softmax --gates none --lengths 1024 --compile
# 4. training step of every kind and gate at every T (sigmoid / elu1 / linear through Triton)
bench 120 train --skip kernels nanogpt --gates none elementwise --train-backend triton
exit $status
