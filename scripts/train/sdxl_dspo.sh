#!/usr/bin/env bash
# DSPO on SDXL with the SDPO safeguard (beta 5000, mu 0.6, lr 1e-9, fp16-fix VAE).
# Usage: bash scripts/train/sdxl_dspo.sh [extra train.py flags]
# Env overrides: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, VAE, NUM_GPUS, ACCELERATE_CONFIG (see _launch.sh).
set -euo pipefail
export MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}"
export VAE="${VAE-madebyollin/sdxl-vae-fp16-fix}"
export OUTPUT_DIR="${OUTPUT_DIR:-outputs/sdxl_dspo}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" --sdxl --train_method dspo --beta_dpo 5000 --winner_preserving_mu 0.6 --learning_rate 1e-9 "$@"
