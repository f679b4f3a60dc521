#!/usr/bin/env bash
# Evaluate a FLUX.1 transformer: papv2, hpsv2 and partiprompts at 1024x1024 with FluxPipeline's
# defaults (28 FlowMatchEuler steps, embedded guidance 3.5, i.e. CFG=2.5 here: guidance_scale =
# CFG + 1; FLUX.1-dev is guidance-distilled, one forward per step), seed 0, scored with the five
# metrics. The one initial noise per prompt is shared (drawn [1, C, h, w], then 2x2-packed).
#
#   bash scripts/eval/test_flux.sh runs/x/pytorch_lora_weights.safetensors  # LoRA weights
#   bash scripts/eval/test_flux.sh runs/x/checkpoint-500/                    # a run / LoRA folder
#   bash scripts/eval/test_flux.sh runs/x/unet.pth                           # merged weights
#   bash scripts/eval/test_flux.sh base
#
# Outputs: beside the weights in eval_flux/. Same environment variables as test_sd15.sh
# (SIZE [1024], STEP [28], CFG [2.5], MODEL_NAME [black-forest-labs/FLUX.1-dev], ...).
set -euo pipefail
EVAL_KIND=flux exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
