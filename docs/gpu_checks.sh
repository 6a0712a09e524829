#!/bin/bash
# The prepared device check: run from the repository root on a CUDA machine with OUT set to a folder:
#   OUT=gpu-out bash docs/gpu_checks.sh
# It runs the CUDA-only tests, python -m triton_kernels.bench, the HaloLinear benchmark and the
# optimizer step benchmark, each time-boxed, and leaves log.txt and the tables in $OUT.
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"; } >>$L 2>&1
echo "=== CUDA tests" >>$L
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_galore_fused.py tests/test_galore_checkpoint.py tests/test_natural_galore.py tests/test_state8bit.py -k "cuda or gpu" >>$L 2>&1; echo "rc=$?" >>$L
echo "=== triton_kernels.bench" >>$L
timeout 230 python -m triton_kernels.bench --out /tmp/tk >>$L 2>&1; echo "rc=$?" >>$L
cp /tmp/tk/triton_bench.md $OUT/tk.md 2>/dev/null; cp /tmp/tk/triton_bench.json $OUT/tk.json 2>/dev/null
echo "=== halo_gpu (auto backend: Triton on CUDA)" >>$L
timeout 70 python -m galorex.bench.halo_gpu --out /tmp/h1 >>$L 2>&1; echo "rc=$?" >>$L
cp /tmp/h1/halo_gpu.md $OUT/halo.md 2>/dev/null
echo "=== bench step llama-60m" >>$L
timeout 60 python -m galorex.bench --out /tmp/st step --model llama-60m --repeats 10 --natural-history 0 >>$L 2>&1; echo "rc=$?" >>$L
cp /tmp/st/step.md $OUT/step.md 2>/dev/null
echo "=== layer-wise peak memory (CUDA max allocated)" >>$L
timeout 90 python -m galorex.bench --out /tmp/lw layerwise-memory --model llama-60m --batch-size 4 --seq-len 256 >>$L 2>&1; echo "rc=$?" >>$L
cp /tmp/lw/layerwise_memory.md $OUT/layerwise.md 2>/dev/null
echo "=== refresh: exact vs randomized" >>$L
timeout 60 python -m galorex.bench --out /tmp/rf refresh --m 4096 --n 11008 --rank 512 >>$L 2>&1; echo "rc=$?" >>$L
cp /tmp/rf/refresh.md $OUT/refresh.md 2>/dev/null
date -u >>$L
