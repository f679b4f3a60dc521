#!/usr/bin/env bash
# Evaluate an SD3 / SD3.5 transformer: papv2, hpsv2 and partiprompts at 1024x1024 with the
# FlowMatchEuler sampler at the SD3.5 Medium model card's settings (40 steps, guidance_scale 4.5,
# i.e. CFG=3.5 in this repository's cond + cfg*(cond - uncond) convention), seed 0, scored with
# the five metrics. The one initial noise per prompt is shared, as for SD1.5.
#
#   bash scripts/eval/test_sd3.sh runs/x/pytorch_lora_weights.safetensors   # LoRA weights
#   bash scripts/eval/test_sd3.sh runs/x/checkpoint-500/                     # a run / LoRA folder
#   bash scripts/eval/test_sd3.sh runs/x/unet.pth                            # merged weights
#   bash scripts/eval/test_sd3.sh base
#
# A LoRA is loaded with the pipeline's load_lora_weights; a folder holding unet/ (a finished run)
# evaluates its merged transformer. Outputs: beside the weights in eval_sd3/. Same environment
# variables as test_sd15.sh (SIZE [1024], STEP [40], CFG [3.5], MODEL_NAME
# [stabilityai/stable-diffusion-3.5-medium], SEED, BATCH_SIZE, DTYPE, VAE, SETS, METRICS, ...).
set -euo pipefail
EVAL_KIND=sd3 exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
