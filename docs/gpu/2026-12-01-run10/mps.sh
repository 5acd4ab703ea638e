#!/usr/bin/env bash
# The tenth run's second visit: the same pair of engines without and then with CUDA MPS (a control daemon for this
# run only, stopped at the end), each time the small pool's step-path levers alone and beside the busy large engine,
# and a reduced sweep of both beside the other. Run from the repository root with vLLM on the path.
#   OUT=results/gpu/run10-mps bash docs/gpu/2026-12-01-run10/mps.sh
set -uo pipefail
OUT="${OUT:-results/gpu/run10-mps}"
here="$(dirname "${BASH_SOURCE[0]}")"
PHASES="small:levers+busy,small:sweep+busy,large:sweep+busy,small:levers"
ARGS=(--contexts 2000 --decode-seqs 1,32,64 --prefill 0,1024 --lever-iterations 150)
mkdir -p "$OUT"
OUT="$OUT/nomps" SWEEP_LIMIT_S="${PART_LIMIT_S:-225}" bash "$here/sweep.sh" "$PHASES" "${ARGS[@]}"
tar czf "$OUT/nomps.tgz" -C "$OUT" nomps && rm -rf "$OUT/nomps"
mps="$(mktemp -d)"
export CUDA_MPS_PIPE_DIRECTORY="$mps" CUDA_MPS_LOG_DIRECTORY="$mps"
nvidia-cuda-mps-control -d && echo "MPS control daemon started"
OUT="$OUT/mps" SWEEP_LIMIT_S="${PART_LIMIT_S:-225}" bash "$here/sweep.sh" "$PHASES" "${ARGS[@]}"
echo quit | nvidia-cuda-mps-control && echo "MPS control daemon stopped"
tar czf "$OUT/mps.tgz" -C "$OUT" mps && rm -rf "$OUT/mps"
