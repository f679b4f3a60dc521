#!/usr/bin/env bash
# Build on-policy preference pairs with python -m eval.pairs: K images per prompt from the base
# model (or a trained unet.pth), scored by the evaluation's scorers, best vs worst per prompt,
# written as Pick-a-Pic-schema parquet shards that train.py reads as a local folder.
#
#   bash scripts/data/make_pairs.sh <prompts file|set> <outdir> [unet.pth|base] [extra eval.pairs args]
#   bash scripts/data/make_pairs.sh prompts/smoke.json data/onpolicy_r0
#   bash scripts/data/make_pairs.sh papv2 data/onpolicy_r1 runs/r0/unet.pth --pair_mode all
#
# then: python train.py --train_data_dir <outdir> ... (no other data flag)
#
# Environment (defaults in brackets):
#   MODEL_NAME [stable-diffusion-v1-5/stable-diffusion-v1-5]  K [4] images per prompt
#   METRICS [pickscore] one metric or a comma list  WEIGHTS [] comma list (default 1 each)
#   PAIR_MODE [best_worst]  MIN_GAP [0]  SIZE []  STEP [50]  CFG [7.5]  SEED [0]
#   BATCH_SIZE [1]  DTYPE [bf16]  MAX_PROMPTS []  NUM_PROCESSES [number of GPUs] (>1: accelerate)
#   SCORE_DEVICE [auto]  PYTHON [python]
# Rerunning the same command resumes: finished images and scores are kept.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # This header, then the flags of the command it runs.
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  cd "$(dirname "$0")/../.."
  exec "${PYTHON:-python}" -m eval.pairs --help
fi
if [[ $# -lt 2 ]]; then
  echo "usage: bash $0 <prompts file|set> <outdir> [unet.pth|base] [extra eval.pairs args]" >&2
  exit 2
fi
PROMPTS="$1"
OUTDIR="$2"
UNET="${3:-base}"
shift $(( $# >= 3 ? 3 : 2 ))

MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
PYTHON="${PYTHON:-python}"
ARGS=(
  --prompts "$PROMPTS" --outdir "$OUTDIR"
  --pretrained_model_name_or_path "$MODEL_NAME"
  --num_images "${K:-4}" --metrics "${METRICS:-pickscore}"
  --pair_mode "${PAIR_MODE:-best_worst}" --min_gap "${MIN_GAP:-0}"
  --steps "${STEP:-50}" --cfg "${CFG:-7.5}" --seed "${SEED:-0}"
  --batch_size "${BATCH_SIZE:-1}" --dtype "${DTYPE:-bf16}"
  --score_device "${SCORE_DEVICE:-auto}"
)
[[ "$UNET" != base ]] && ARGS+=(--unet_path "$UNET")
[[ -n "${WEIGHTS:-}" ]] && ARGS+=(--metric_weights "$WEIGHTS")
[[ -n "${SIZE:-}" ]] && ARGS+=(--size "$SIZE")
[[ -n "${MAX_PROMPTS:-}" ]] && ARGS+=(--max_prompts "$MAX_PROMPTS")

if [[ -z "${NUM_PROCESSES:-}" ]]; then
  NUM_PROCESSES=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
if [[ "$NUM_PROCESSES" -gt 1 ]]; then
  exec accelerate launch --num_processes "$NUM_PROCESSES" -m eval.pairs "${ARGS[@]}" "$@"
fi
exec "$PYTHON" -m eval.pairs "${ARGS[@]}" "$@"
