#!/usr/bin/env bash
# The one GPU check: build the CUDA extension, run the GPU-marked tests, run the GPU benchmark
# matrix, write JSON and logs to $OUT (default benchmarks/results/gpu_<date>), print a short
# table last. Budget: under 8 minutes on one H100 / H200 (each stage's time is in its log;
# docs/gpu.md lists the runs). The registers table is opt-in (GPU_CHECK_REGISTERS=1;
# tools/triton_aot.py writes it on any machine with ptxas). Each stage runs under its own
# timeout and a failing stage does not stop the later ones (a failed build still leaves
# triton/torch). GPU_CHECK_BENCHES="losses host" (say) runs only those benchmarks.
# It writes up to 8 files to $OUT (log, junit XML, 4 benchmark JSON, registers, summary): the lent
# GPU machine of this project's workplace returns at most 8, so add a file only by merging two.
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
QUICK="${1:-}"
stage() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0], torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

stage "build (CUDA extension)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if ELOGITNORM_FAST_BUILD_CUDA=force timeout 300 "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index -e . >> "$LOG" 2>&1; then
  build="cuda"
else
  echo "CUDA build FAILED (see above); falling back to the CPU extension" | tee -a "$LOG"
  ELOGITNORM_FAST_BUILD_CUDA=never timeout 200 "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index -e . >> "$LOG" 2>&1 && build="cpu-only" || build="none"
fi
"$PY" -c "import elogitnorm_fast as ef; print('backends on cuda:', ef.available_backends('cuda'))" 2>&1 | tee -a "$LOG"

stage "GPU tests"
timeout 200 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  >> "$LOG" 2>&1
tests_rc=$?
# What this machine's torch believes each traced Triton launch writes (torch.compile's copies).
timeout 60 "$PY" -m pytest tests/triton/test_triton_traced_writes.py -q -p no:cacheprovider >> "$LOG" 2>&1 \
  || { echo "traced-writes check FAILED (see the log)" | tee -a "$LOG"; tests_rc=1; }
tail -n 25 "$LOG" | grep -E "passed|failed|error" | tail -n 3

stage "benchmarks"
# host before knn / scoring: its rows decide pending defaults; KNN and scoring have barely changed
# since their H100 run (2fa8315), so a run cut short loses those first.
for bench in ${GPU_CHECK_BENCHES:-losses host knn scoring}; do
  script="benchmarks/gpu_${bench}.py"
  [ -f "$script" ] || { echo "missing $script" | tee -a "$LOG"; continue; }
  # gpu_losses.py stops starting new timings after --budget-s and still writes its JSON.
  extra=(); limit=90
  [ "$bench" = "losses" ] && { extra=(--budget-s 100); limit=170; }
  [ "$bench" = "scoring" ] && limit=60
  # gpu_host.py writes its rows after each stage and when stopped (SIGTERM), naming the stage.
  [ "$bench" = "host" ] && limit=120
  timeout "$limit" "$PY" "$script" --out "$OUT" $QUICK "${extra[@]}" >> "$LOG" 2>&1 \
    || echo "gpu_${bench}.py exited $? (timeout $limit s?)" | tee -a "$LOG"
done

if [ "${GPU_CHECK_REGISTERS:-0}" != 0 ]; then
  stage "Triton registers and spills (this machine's triton and ptxas)"
  timeout 90 "$PY" tools/triton_aot.py --out "$OUT/triton_registers_sm90.json" >> "$LOG" 2>&1 \
    || echo "triton_aot.py exited $?" | tee -a "$LOG"
fi

stage "summary"
echo "build: $build   gpu tests exit code: $tests_rc"
"$PY" benchmarks/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.md"
