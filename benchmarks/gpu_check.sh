#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool's `run`): build the CUDA extension, run the test
# suite on the GPU (Triton compiled, not interpreted), then the benchmarks at W1 shapes. Everything
# lands in $OUT (default benchmarks/results/gpu-check/) with the environment; nothing is fetched
# (that machine has no network: --no-deps, --no-build-isolation against its CUDA torch).
# Usage: bash benchmarks/gpu_check.sh [pytest -k expression for the benchmarks]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
unset TRITON_INTERPRET
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
t0=$SECONDS
MAX_JOBS=${MAX_JOBS:-16} pip install --no-deps --no-build-isolation -e . > "$OUT/build.txt" 2>&1 \
  && echo "build: ok ($((SECONDS - t0)) s)" || echo "build: FAILED ($((SECONDS - t0)) s), see $OUT/build.txt"
python -m wam_fast.info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"
t0=$SECONDS
python -m pytest tests -q -p no:cacheprovider -rs > "$OUT/tests.txt" 2>&1
echo "tests: exit $? ($((SECONDS - t0)) s)"; tail -n 15 "$OUT/tests.txt"
t0=$SECONDS
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider ${1:+-k "$1"} \
  --benchmark-json "$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks.txt" 2>&1
echo "benchmarks: exit $? ($((SECONDS - t0)) s)"; tail -n 60 "$OUT/benchmarks.txt"
t0=$SECONDS
python -m wam_fast.bench --steps 4 --json "$OUT/bench_w1_steps4.json" > "$OUT/bench_w1_steps4.txt" 2>&1
echo "wam_fast.bench --steps 4 (paper baseline at 4 steps, temporal uncached vs KV cache): exit $? ($((SECONDS - t0)) s)"
tail -n 25 "$OUT/bench_w1_steps4.txt"
