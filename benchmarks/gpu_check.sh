#!/usr/bin/env bash
# One prepared GPU check: first the AOT plugin kernels loaded and launched through the CUDA driver API as TensorRT
# would (needs cuda-python), then the Triton kernels, the decode sweep, the CUDA cases of the kernel tests
# (a few minutes; installs nothing; needs python3 with torch+triton).
# Results go to $OUT if set (the device tool's output folder), else benchmarks/results/:
#   gpu_check_<gpu>.json/.md and decode_sweep_<gpu>.json/.md (written by the two scripts, each with the git
#   commit, command, versions and GPU), and gpu_check_<gpu>_log.txt (this script's whole output, same header).
# Where the checkout has no .git, pass the commit: MISTRAL_EXPORT_COMMIT=<hash> benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
tag=$(python3 benchmarks/provenance.py --gpu-tag) || { echo "no CUDA GPU visible to torch" >&2; exit 1; }
log="$results/gpu_check_${tag}_log.txt"
{
  echo "# benchmarks/gpu_check.sh"
  python3 benchmarks/provenance.py --header torch triton
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
} | tee "$log"
# The plugin path below TensorRT: each AOT kernel's PTX through cuModuleLoadData/cuLaunchKernel with the plugin's
# grid, block, shared memory and argument order, against the torch reference (aot_driver_check_<gpu>.*).
if python3 -c "import cuda.bindings.driver" 2>/dev/null || python3 -c "from cuda import cuda" 2>/dev/null; then
  timeout 240 python3 benchmarks/aot_driver_check.py 2>&1 | tee -a "$log"
  aot_status=${PIPESTATUS[0]}
else
  echo "cuda-python not importable: the AOT driver check did not run" | tee -a "$log"
  aot_status=1
fi
# The kernel checks and timings bound their own time (GPU_CHECK_BUDGET_S); the outer timeout is a backstop.
timeout 300 python3 benchmarks/gpu_check.py 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
# Batch-1 decode: where the time goes (fixed floor, a size-matched plain read of the same bytes, launch
# variants); bounded by its own budget, so the whole script stays under the device tool's 10 minutes.
DECODE_SWEEP_BUDGET_S=150 timeout 200 python3 benchmarks/decode_sweep.py 2>&1 | tee -a "$log"
# The CUDA cases of the kernel test suite (same cases as the interpreter runs on CPU), bounded.
if python3 -c "import pytest" 2>/dev/null; then
  timeout 75 python3 -m pytest tests/test_kernels.py -k cuda -q -p no:cacheprovider 2>&1 | tail -25 | tee -a "$log"
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
[ "$status" -eq 0 ] && status=$aot_status
exit "$status"
