#!/usr/bin/env bash
# GPU check in about 8 minutes (each step has its own limit; the limits add up to about 15 min):
# correctness of every fast attention path, then the timings.
#   bash bench/gpu_check.sh            (from the repo root; results under $OUT or out/bench)
#   ONLY="selfcheck streaming retrofit_gate retrofit_sink_logit" bash bench/gpu_check.sh   (some steps,
#   by name: check kernels nanogpt train selfcheck streaming retrofit_gate retrofit_sink_logit)
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
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
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
# 5. the backend self-check's cost on this GPU: every kind in bf16, once per process (its lines)
run_step 60 selfcheck "$PY" -c "
import torch
from model import GPT, GPTConfig
for kind in ('softmax', 'sigmoid', 'elu1', 'linear'):
    GPT(GPTConfig(n_layer=1, n_embd=768, n_head=12, vocab_size=256, block_size=1024, attention=kind)).to('cuda', torch.bfloat16)
"
# 6. streaming at SmolLM2-135M widths (random Llama: 30 layers, 576 wide, 9 heads): the exact parallel
#    form vs token-by-token vs transformers' own KV-cache decoding, 4 sinks + 252 window
bench 150 streaming --skip kernels train nanogpt --n-layer 30 --n-head 9 --n-embd 576 --vocab 49152 \
  --stream-tokens 2048 --stream-window 252
# 7. a retrofit step at the same widths, T=1024: the import's step (control), + elementwise gate,
#    + learned sink logit (sdpa: flash has no sink logit)
bench 90 retrofit_gate --skip kernels nanogpt streaming --kinds softmax --gates none elementwise --lengths 1024 \
  --n-layer 30 --n-head 9 --n-embd 576 --vocab 49152 --reps 5
bench 60 retrofit_sink_logit --skip kernels nanogpt streaming --kinds softmax --gates none --lengths 1024 \
  --n-layer 30 --n-head 9 --n-embd 576 --vocab 49152 --reps 5 --sink-logit learned
exit $status
