#!/usr/bin/env bash
# The tenth run's engine-level measurements on one H200: both pools' engines in process, side by side on the GPU
# (loadtests/engine_sweep.py). Run from the repository root with vLLM on the path; results under ${OUT:-results/gpu/run10}.
#   bash docs/gpu/2026-12-01-run10/sweep.sh [PHASES] [EXTRA ARGS FOR BOTH PROCESSES...]
set -uo pipefail
OUT="${OUT:-results/gpu/run10}"
PHASES="${1:-small:profile,small:profile+busy,large:profile,large:profile+busy,small:sweep,large:sweep,small:sweep+busy,large:sweep+busy,small:levers,small:levers+busy}"
shift || true
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 RAY_AUTH_MODE=disabled
PY="${PYTHON:-python3}"
mkdir -p "$OUT/raw"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/raw/gpu.txt"
"$PY" -m loadtests.gpu_models models/bench
sync_dir="$(mktemp -d)"
pids=()
for model in small large; do
  timeout "${SWEEP_LIMIT_S:-500}" "$PY" -m loadtests.engine_sweep run --model "$model" --phases "$PHASES" --sync "$sync_dir" \
    --out "$OUT/$model.json" --trace-dir "$OUT/raw" "$@" > "$OUT/raw/$model.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "process $pid exited $?"; done
"$PY" -m loadtests.engine_sweep merge "$OUT/small.json" "$OUT/large.json" --out "$OUT/engine-sweep.json"
grep -h "engine ready\|phase .* took\|Asynchronous scheduling\|Error\|error" "$OUT/raw/"*.log | grep -v "^ *$" | head -40
tar czf "$OUT/raw.tgz" -C "$OUT" raw && rm -rf "$OUT/raw"
