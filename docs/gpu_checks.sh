#!/bin/bash
# The prepared device check: run from the repository root on a CUDA machine with OUT set to a folder:
#   OUT=gpu-out bash docs/gpu_checks.sh            # BUDGET=480 seconds in all by default
# Correctness first (CUDA-only tests, the Triton kernels against their torch twins inside
# triton_kernels.bench), then the speed tables, most wanted first: triton_kernels.bench (issue 7),
# the HaloLinear benchmark on the Triton path (issue 6), the optimizer step with the fused Triton
# step and with the default, refresh and layer-wise memory. On CUDA every operation takes the torch
# path unless GALOREX_BACKEND=triton (triton_kernels.dispatch.CUDA_DEFAULT): the Triton rows here
# are what would flip a default, one operation at a time. Every step
# gets at most its own limit and never more than what is left of BUDGET, so the whole script ends
# inside the device call's limit with room for a second try. Leaves log.txt and the tables
# (at most 11 files) in $OUT.
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-480}
START=$(date +%s)
L=$OUT/log.txt
step() {  # step NAME LIMIT COMMAND...: run COMMAND with min(LIMIT, time left), log its status
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then echo "=== $name: skipped, ${left}s of the budget left" >>"$L"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s)" >>"$L"
  local t0=$(date +%s)
  timeout "$limit" "$@" >>"$L" 2>&1
  echo "rc=$? in $(($(date +%s) - t0))s" >>"$L"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"; } >>"$L" 2>&1
step "CUDA tests" 60 python -m pytest -q -p no:cacheprovider tests/test_galore_fused.py tests/test_galore_checkpoint.py tests/test_natural_galore.py tests/test_state8bit.py -k "cuda or gpu"
# HaloLinear's Triton path against its torch path on the GPU (first compiles and autotunes each kernel)
step "CUDA HALO wiring" 90 python -m pytest -q -p no:cacheprovider tests/test_halo_triton_path.py -k cuda
step "triton_kernels.bench" 170 python -m triton_kernels.bench --out /tmp/tk
cp /tmp/tk/triton_bench.md "$OUT/tk.md" 2>/dev/null; cp /tmp/tk/triton_bench.json "$OUT/tk.json" 2>/dev/null
step "halo_gpu (GALOREX_BACKEND=triton)" 100 env GALOREX_BACKEND=triton python -m galorex.bench.halo_gpu --out /tmp/h1
cp /tmp/h1/halo_gpu.md "$OUT/halo.md" 2>/dev/null
step "bench step llama-60m (GALOREX_BACKEND=triton: fused step)" 45 env GALOREX_BACKEND=triton python -m galorex.bench --out /tmp/stt step --model llama-60m --repeats 10 --natural-history 0
cp /tmp/stt/step.md "$OUT/step_triton.md" 2>/dev/null
step "bench step llama-60m (default: torch)" 45 python -m galorex.bench --out /tmp/st step --model llama-60m --repeats 10 --natural-history 0
cp /tmp/st/step.md "$OUT/step.md" 2>/dev/null
# INT8 weights (issue 25): the layer against bf16 nn.Linear, and the 7B recipe's peak as CUDA max allocated
step "int8-linear (bf16)" 30 python -m galorex.bench --out /tmp/i8 int8-linear
cp /tmp/i8/int8_linear.md "$OUT/int8_linear.md" 2>/dev/null
step "peak 7B, INT8 weights" 150 python -m galorex.bench --out /tmp/pk peak-memory --steps 2 -- --model llama-7b --dtype bf16 --optimizer galore --rank 1024 --update-proj-gap 200 --scale 0.25 --refresh-method randomized --optim-bits 8 --basis-bits 4 --layerwise --activation-checkpointing --batch-size 1 --seq-len 256 --weight-bits 8
cp /tmp/pk/peak_memory.md "$OUT/peak7b_int8.md" 2>/dev/null
step "refresh: exact vs randomized" 40 python -m galorex.bench --out /tmp/rf refresh --m 4096 --n 11008 --rank 512
cp /tmp/rf/refresh.md "$OUT/refresh.md" 2>/dev/null
step "layer-wise peak memory (CUDA max allocated)" 60 python -m galorex.bench --out /tmp/lw layerwise-memory --model llama-60m --batch-size 4 --seq-len 256
cp /tmp/lw/layerwise_memory.md "$OUT/layerwise.md" 2>/dev/null
echo "total $(($(date +%s) - START))s" >>"$L"
date -u >>"$L"
