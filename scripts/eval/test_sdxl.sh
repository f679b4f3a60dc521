#!/usr/bin/env bash
# Evaluate an SDXL UNet as the paper does: papv2, hpsv2 and partiprompts at 1024x1024 with the
# madebyollin/sdxl-vae-fp16-fix VAE (Euler, 50 steps, cfg 7.5, seed 0), scored with the five
# metrics. Outputs beside the UNet in $(dirname unet.pth)/eval_sdxl/.
#
#   bash scripts/eval/test_sdxl.sh runs/x/checkpoint-2000/unet.pth [extra eval.generate args]
#
# Same environment variables as test_sd15.sh (SIZE [1024], STEP, CFG, SEED, BATCH_SIZE, DTYPE,
# MODEL_NAME [stabilityai/stable-diffusion-xl-base-1.0], VAE [auto = fp16-fix], SETS, METRICS,
# PROMPTS_FROM, OUTDIR, NUM_PROCESSES, DEVICE, SCORE_BATCH_SIZE, PYTHON); see that file.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  echo "usage: bash $0 <unet.pth | UNet folder | base> [extra eval.generate args]"
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
EVAL_KIND=sdxl exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
