#!/usr/bin/env bash
# The figures only a GPU can give, in one pass of about six minutes on one Hopper GPU: the FP8
# kernels compiled for real (TFLOPS against torch's bf16 matmul and _scaled_mm, same run), tokens/s
# and MFU of the small preset in bf16 and fp8, and the 300-step fp8 vs bf16 loss parity. Each
# benchmark's output goes to OUT_DIR (default gpu-check/) as well as the console. Not used by CI.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail  # not -e: one failing benchmark must not cost the others' figures
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; run it on a GPU host (the CPU twins run in duet-bench)" >&2
    exit 2
fi
out="${1:-gpu-check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
run() {  # name, command...: time it, keep its output, go on whatever it returns
    local name="$1"; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.txt"
}
run fp8_gemm python -m benchmarks.fp8_gemm --reps 20
run throughput python -m benchmarks.throughput --steps 10 --warmup 3
run fp8_parity python -m benchmarks.fp8_parity --steps 300 --seeds 3 --out "$out/parity"
run alltoall_bw python -m benchmarks.alltoall_bw --reps 5
