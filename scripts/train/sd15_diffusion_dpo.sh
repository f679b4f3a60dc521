#!/usr/bin/env bash
# Diffusion-DPO on SD1.5 with the SDPO safeguard (beta 5000, mu 0.9, lr 1e-8).
# Usage: bash scripts/train/sd15_diffusion_dpo.sh [extra train.py flags]
# Env overrides: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, VAE, NUM_GPUS, ACCELERATE_CONFIG (see _launch.sh).
set -euo pipefail
export MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
export VAE="${VAE-}"
export OUTPUT_DIR="${OUTPUT_DIR:-outputs/sd15_diffusion_dpo}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" --train_method diffusion-dpo --beta_dpo 5000 --winner_preserving_mu 0.9 --learning_rate 1e-8 "$@"
