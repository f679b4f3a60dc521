#!/usr/bin/env bash
# dmpo on FLUX.1-dev with the SDPO safeguard, LoRA (docs/flow.md). Flow-matching settings
# from Flow-GRPO's SD3.5 DPO baseline (Liu et al. 2025, arXiv 2505.05470; yifan123/flow_grpo,
# config/dpo.py + scripts/train_sd3_dpo.py): beta 100 on the per-sample mean velocity MSE, LoRA
# r 32 / alpha 64 on the joint-attention projections, lr 3e-4, logit-normal(0, 1) timesteps.
# DSPO's beta is the SD1.5 recipe's (our extension to velocity targets: untuned); DMPO reuses
# the DPO beta with alpha 0.01; mu 0.6 is the SDXL recipes' (untuned on flow models).
# Batch: 2 pairs x 4 accumulation x 8 GPUs = 64 pairs; --scale_lr makes the per-pair lr
# 4.6875e-6 x 64 = 3e-4 (fewer GPUs: a proportionally smaller lr, as every recipe here).
# Usage: bash scripts/train/flux_dmpo.sh [extra train.py flags]
# Env overrides: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, NUM_GPUS, ACCELERATE_CONFIG (see _launch.sh).
set -euo pipefail
export MODEL_NAME="${MODEL_NAME:-black-forest-labs/FLUX.1-dev}"
export VAE="${VAE-}"
export OUTPUT_DIR="${OUTPUT_DIR:-outputs/flux_dmpo}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" --train_method dmpo --beta_dpo 100 --dmpo_alpha 0.01 --winner_preserving_mu 0.6 \
  --resolution 1024 --train_batch_size 2 --gradient_accumulation_steps 4 --learning_rate 4.6875e-6 \
  --lora_rank 32 --lora_alpha 64 --lora_target_modules to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out \
  --gradient_checkpointing --lr_warmup_steps 100 "$@"
