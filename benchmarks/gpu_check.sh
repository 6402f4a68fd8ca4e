#!/usr/bin/env bash
# One prepared GPU check of the Triton kernels, then the decode sweep (a few minutes; installs nothing;
# needs python3 with torch+triton).
# Results go to $OUT if set (the device tool's output folder), else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$results/gpu_check_nvidia_smi.txt"
# The kernel checks and timings bound their own time (GPU_CHECK_BUDGET_S); the outer timeout is a backstop.
timeout 300 python3 benchmarks/gpu_check.py 2>&1 | tee "$results/gpu_check_log.txt"
status=${PIPESTATUS[0]}
# Batch-1 decode: where the time goes (fixed floor, a size-matched plain read of the same bytes, launcher
# variants); bounded by its own budget, so the whole script stays under the device tool's 10 minutes.
DECODE_SWEEP_BUDGET_S=150 timeout 200 python3 benchmarks/decode_sweep.py 2>&1 | tee "$results/decode_sweep_log.txt"
# The CUDA cases of the kernel test suite (same cases as the interpreter runs on CPU), bounded.
if command -v pytest >/dev/null 2>&1 || python3 -c "import pytest" 2>/dev/null; then
  timeout 75 python3 -m pytest tests/test_kernels.py -k cuda -q -p no:cacheprovider 2>&1 | tail -25 \
    | tee "$results/gpu_check_pytest.txt"
fi
# The TensorRT path (engine build through `build`, plugin layers, TensorRT vs ONNX Runtime, the runner's in-place
# cache and CUDA graph, the other-GPU refusal): the tests marked `tensorrt`, where TensorRT and the export stack import.
if python3 -c "import tensorrt, polygraphy, onnxruntime, onnxscript, rich" 2>/dev/null; then
  timeout 300 python3 -m pytest tests/test_tensorrt_engine.py tests/test_tensorrt_plugins.py -m tensorrt -q -rs \
    -p no:cacheprovider 2>&1 | tail -40 | tee "$results/gpu_check_tensorrt_pytest.txt"
else
  echo "TensorRT (or the export stack) not importable: tensorrt-marked tests not run" \
    | tee "$results/gpu_check_tensorrt_pytest.txt"
fi
exit "$status"
