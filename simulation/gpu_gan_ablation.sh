#!/usr/bin/env bash
# The GAN ablation (none / sampler / cGAN / sampler + cGAN) at a GPU budget: 64 px GAN, seeds 0 1 2.
# Usage: bash simulation/gpu_gan_ablation.sh HAM10000_DIR RESULTS_DIR [SEED ...]      (seeds default to 0 1 2)
# Environment: GAN_ROUNDS (default 10), GAN_STEPS (local steps per round, default 200), GAN_SIZE (default 64),
# GAN_CHANNELS (default 64), ROUNDS / STEPS (classifier rounds and steps per site and round, default 4 / 60),
# DEVICE (default cuda; cpu runs the same script tiny for a check, with small budgets given here).
# Finished seeds stay in RESULTS_DIR/seedN: run it again to complete an interrupted ablation.
set -euo pipefail
data=${1:?give the HAM10000 folder}
out=${2:?give a results folder}
shift 2
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
if [ "${DEVICE:-cuda}" = cuda ]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: run this on a GPU machine (DEVICE=cpu only for a check)')"
fi
python -m simulation.gan_ablation --data "$data" --runs-dir "$out" --seeds "${seeds[@]}" \
    --image-size 64 --rounds "${ROUNDS:-4}" --max-steps "${STEPS:-60}" \
    --gan-image-size "${GAN_SIZE:-64}" --gan-channels "${GAN_CHANNELS:-64}" \
    --gan-rounds "${GAN_ROUNDS:-10}" --gan-local-steps "${GAN_STEPS:-200}" --gan-batch-size 32
