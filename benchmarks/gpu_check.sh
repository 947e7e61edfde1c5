#!/usr/bin/env bash
# Builds torchprune with its CUDA ops, runs the CUDA tests and every GPU benchmark, and writes
# everything (logs, JSON, PNG, nvidia-smi, versions, a summary) into one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: gpu-results/
#
# Environment:
#   QUICK=1               benchmarks in --quick mode (minutes -> seconds; tables still printed)
#   GPU_CHECK_PIP=1       build with `FORCE_CUDA=1 pip install --no-build-isolation -e ".[test]"`
#                         (needs the network for the test extras) instead of the default
#                         `FORCE_CUDA=1 python setup.py build_ext --inplace` (needs nothing)
#   TORCH_CUDA_ARCH_LIST  target GPUs; default: the compute capability of GPU 0 only (halves the
#                         build time against setup.py's default of sm_80 + sm_90)
#   MAX_JOBS              parallel compiler processes (default: 8)
#   GPU_CHECK_PREBUILT    a folder holding a torchprune/_C*.so built elsewhere for this machine's
#                         python, torch and GPU (saves the build on a machine rented by the minute);
#                         it is used when its CUDA ops register, else the script builds as usual
#   TEST_WORKERS          pytest-xdist processes for the tests where xdist is installed (default: 8)
#   STEP_TIMEOUT          seconds each test or benchmark step may run before it is stopped (default: none)
#   BENCH_LINEAR_ARGS     bench_linear's arguments instead of the --quick grid (e.g. "--sparsities 0.9
#                         --batches 1,16,64,128,512,2048": every shape, M 1-2048, at 90%)
#
# Every step runs even if an earlier one failed (except everything after a failed build); the
# exit status is non-zero if any step failed, and summary.txt says which.
set -uo pipefail

out=${1:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
quick=()
[[ "${QUICK:-0}" == "1" ]] && quick=(--quick)
failed=()
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME LOGFILE COMMAND...: runs COMMAND, logs it, times it, records the outcome
  local name=$1 logfile=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$summary"
  if "$@" > "$logfile" 2>&1; then
    echo "   ok ($((SECONDS - start)) s) -> $(basename "$logfile")" | tee -a "$summary"
  else
    echo "   FAILED (status $?, $((SECONDS - start)) s) -> $(basename "$logfile")" | tee -a "$summary"
    tail -n 20 "$logfile" | sed 's/^/   | /'
    failed+=("$name")
    return 1
  fi
}

# ---- the machine ---------------------------------------------------------------------------
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
nvidia-smi -q > "$out/nvidia-smi-q.txt" 2>&1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
  echo "gcc: $(g++ --version 2>&1 | head -n 1)"
  "$python" - <<'EOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  [[ -n "$cap" ]] && export TORCH_CUDA_ARCH_LIST=$cap
fi
export MAX_JOBS=${MAX_JOBS:-8}
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} MAX_JOBS=$MAX_JOBS" | tee -a "$summary"

# ---- build -----------------------------------------------------------------------------------
if [[ "${GPU_CHECK_PIP:-0}" == "1" ]]; then
  build=(env FORCE_CUDA=1 "$python" -m pip install --no-build-isolation -e ".[test]")
else
  build=(env FORCE_CUDA=1 "$python" setup.py build_ext --inplace)
fi
registered() {  # the CUDA kernels of the ops are there
  "$python" -c "
import torch, torchprune.ops
for op in ('masked_linear', 'compact', 'sparse_linear', 'pack_csr'):
    print(op, 'CUDA kernel:', torch._C._dispatch_has_kernel_for_dispatch_key('torchprune::' + op, 'CUDA'))
assert torch._C._dispatch_has_kernel_for_dispatch_key('torchprune::masked_linear', 'CUDA'), 'no CUDA kernels'
"
}
prebuilt=0
if [[ -n "${GPU_CHECK_PREBUILT:-}" ]] && compgen -G "$GPU_CHECK_PREBUILT/_C*.so" > /dev/null; then
  copied=()
  for so in "$GPU_CHECK_PREBUILT"/_C*.so; do
    cp "$so" torchprune/ && copied+=("torchprune/$(basename "$so")")
  done
  if registered > "$out/prebuilt_check.log" 2>&1; then
    prebuilt=1
    echo "== build: skipped, ${copied[*]} from $GPU_CHECK_PREBUILT registers its CUDA ops" | tee -a "$summary"
  else
    echo "== prebuilt extension rejected (see prebuilt_check.log): building" | tee -a "$summary"
    rm -f "${copied[@]}"
  fi
fi
if ((!prebuilt)) && { ! step build "$out/build.log" "${build[@]}" ||
                      ! step "CUDA ops registered" "$out/build_check.log" registered; }; then
  echo "build failed: no tests or benchmarks run (see $out/build.log)" | tee -a "$summary"
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---- tests: every test file with "cuda" parameters (they run now), the build checks -----------
limit=(timeout "${STEP_TIMEOUT:-0}")
workers=()
"$python" -c "import xdist" 2> /dev/null && workers=(-n "${TEST_WORKERS:-8}")
step tests "$out/tests.log" "${limit[@]}" "$python" -m pytest -q -rs "${workers[@]}" --junitxml="$out/tests.xml" \
  tests/test_masked_ops.py tests/test_compact.py tests/test_sparse_ops.py tests/test_pack.py \
  tests/test_nn.py tests/test_timing.py tests/test_cuda_build.py

# ---- benchmarks ------------------------------------------------------------------------------
if [[ -n "${BENCH_LINEAR_ARGS:-}" ]]; then
  read -r -a linear_args <<< "$BENCH_LINEAR_ARGS"
else
  linear_args=("${quick[@]}")
fi
step bench_linear "$out/bench_linear.log" "${limit[@]}" "$python" benchmarks/bench_linear.py --device cuda \
  "${linear_args[@]}" --out "$out"
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -n 1)
if [[ -n "$ncu_bin" ]]; then  # why the small batches run as they do: bandwidth, occupancy, launch shape
  step profile "$out/profile.log" "${limit[@]}" "$ncu_bin" --clock-control none --section SpeedOfLight \
    --section Occupancy --section LaunchStats --launch-count 80 "$python" benchmarks/gpu_profile.py
else
  echo "== profile: skipped, Nsight Compute (ncu) not found" | tee -a "$summary"
fi
for name in conv models; do
  step "bench_$name" "$out/bench_$name.log" "${limit[@]}" "$python" "benchmarks/bench_$name.py" --device cuda \
    "${quick[@]}" --out "$out"
done
step bench_masked "$out/bench_masked.log" "${limit[@]}" "$python" benchmarks/bench_masked.py --device cuda \
  $([[ "${QUICK:-0}" == "1" ]] && echo "--repeats 5") --out "$out"

nvidia-smi > "$out/nvidia-smi-after.txt" 2>&1
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}" | tee -a "$summary"
  exit 1
fi
echo "all steps passed; results in $out" | tee -a "$summary"
