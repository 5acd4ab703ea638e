#!/usr/bin/env bash
# One H200, both pools on GPU 0 (the one-gpu layout): routed against large only at 64 requests in flight, the
# engines under CUDA MPS (mps) or time-sliced (nomps); from the repository root, results under $OUT/<mode>/.
#   OUT=results/gpu bash docs/gpu/2026-12-02-run11/load.sh mps
set -u
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # Serve imports the project by name: the checkout, where not installed
mode=$1; out=${OUT:-results/gpu}/$mode; mkdir -p "$out"
flag=$([ "$mode" = mps ] && echo --mps)
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout "${LIMIT_S:-500}" python -m loadtests.gpu_bench load --layout one-gpu --steps 24 \
  --levels stream:64,large:64 --rounds "${ROUNDS:-2}" $flag --out "$out" > "$out/log.txt" 2>&1
rc=$?
[ $rc = 0 ] || tar czf "$out/ray-logs.tgz" -C /tmp/ray/session_latest logs 2>/dev/null
grep -v "state-dump\|worker_pool.cc" "$out/log.txt" | tail -40 | cut -c1-600; echo "exit $rc"
