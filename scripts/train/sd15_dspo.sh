#!/usr/bin/env bash
# DSPO on SD1.5 with the SDPO safeguard (beta 0.001, mu 0.2, lr 1e-8).
# Usage: bash scripts/train/sd15_dspo.sh [extra train.py flags]
# Env overrides: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, VAE, NUM_GPUS, ACCELERATE_CONFIG (see _launch.sh).
set -euo pipefail
export MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
export VAE="${VAE-}"
export OUTPUT_DIR="${OUTPUT_DIR:-outputs/sd15_dspo}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" --train_method dspo --beta_dpo 0.001 --winner_preserving_mu 0.2 --learning_rate 1e-8 "$@"
