#!/usr/bin/env bash
# Headline arms of skin-fl-bench (pooled and the default federated run) on one CUDA GPU at 224 px, fp16 + GradScaler.
# Usage: bash simulation/gpu_headline.sh HAM10000_DIR RESULTS_DIR [SEED ...]      (seeds default to 0 1 2)
# Environment: WORKERS (DataLoader workers, default 12), ROUNDS (default 8), ARMS (default "pooled fedavg"),
# DEVICE (default cuda; cpu runs the same script tiny for a check), BENCH_ARGS (more skin-fl-bench options).
# Finished cells stay in RESULTS_DIR: run it again to complete an interrupted table.
set -euo pipefail
data=${1:?give the HAM10000 folder}
out=${2:?give a results folder}
shift 2
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: run this on a GPU machine (DEVICE=cpu only for a check)')"
fi
# shellcheck disable=SC2086
python -m simulation.bench --data "$data" --out "$out" --image-size "${IMAGE_SIZE:-224}" --device "$device" --amp auto \
    --workers "${WORKERS:-12}" --rounds "${ROUNDS:-8}" --arms ${ARMS:-pooled fedavg} --seeds "${seeds[@]}" ${BENCH_ARGS:-}
