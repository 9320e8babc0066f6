#!/usr/bin/env bash
# Every GPU check in one go, for a machine with one CUDA device (under 8 minutes on one H200):
# the CUDA tests (the judge's trunk and blocks processes on the device, under bubblewrap with the
# device nodes bound), the compiled fixed step against eager, children per hour for N = 1..16
# evaluations at once on the full profile (GPU memory per child measured, the best N saved as this
# machine's default), and the judge's cascade overhead on the device.
#
#   bash scripts/gpu_checks.sh          (needs `make install` with a CUDA build of torch, and `make prepare`)
#
# Writes what it measured to $OUT (default openevolve_output/gpu-checks).
set -uo pipefail
case "${1:-}" in  # before anything touches the GPU or the disk
  "") ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "gpu_checks.sh: error: unknown argument '$1' (it takes none; see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-openevolve_output/gpu-checks}
mkdir -p "$OUT"
step() { echo "== $1" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.version.cuda)" \
  | tee -a "$OUT/summary.txt" || exit 1

step "CUDA tests and the compiled step (slow tests included)"
PLASA_DEVICE=cuda timeout 240 "$PY" -m pytest -q -m "" tests/test_cuda.py tests/test_compile.py 2>&1 | tee "$OUT/tests.txt" | tail -3 \
  | tee -a "$OUT/summary.txt"

step "children per hour, full profile, N = 1, 2, 4, 8, 16 (eager, then compiled)"
timeout 150 "$PY" scripts/bench_throughput.py --profile full --concurrency 1,2,4,8,16 --rounds 1 --waves 1 --stage 2 \
  --device cuda --save 2>&1 | tee "$OUT/throughput.txt" | tail -12 | tee -a "$OUT/summary.txt"
PLASA_COMPILE=1 timeout 90 "$PY" scripts/bench_throughput.py --profile full --concurrency 16 --rounds 1 --waves 1 \
  --stage 2 --device cuda 2>&1 | tee "$OUT/throughput_compiled.txt" | tail -4 | tee -a "$OUT/summary.txt"

step "the judge's cascade against the recipe on the device"
timeout 120 "$PY" scripts/bench_eval.py --profile quick --rounds 1 --device cuda 2>&1 | tee "$OUT/bench_eval.txt" \
  | tail -6 | tee -a "$OUT/summary.txt"
