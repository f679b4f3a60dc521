#!/usr/bin/env bash
# N rounds of on-policy preference training (python -m eval.rounds): each round generates K images
# per prompt with the model entering it, pairs them by a reward model, and trains from that model.
#
#   bash scripts/data/rounds.sh <prompts file|set> <outdir> [extra eval.rounds args]
#   ROUNDS=3 PAIRS_ARGS="--num_images 4 --metrics pickscore" \
#     TRAIN_ARGS="--max_train_steps 500 --mixed_precision bf16" \
#     bash scripts/data/rounds.sh prompts/train_prompts.txt runs/iter
#
# Environment (defaults in brackets):
#   MODEL_NAME [stable-diffusion-v1-5/stable-diffusion-v1-5]  ROUNDS [2]  SEED [0]
#   PAIRS_ARGS [--num_images 4 --metrics pickscore]  TRAIN_ARGS [--max_train_steps 500]
#   PYTHON [python]
# Outputs: <outdir>/round_<r>/{pairs,train}, <outdir>/rounds_summary.{json,md}. Rerunning resumes.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # This header, then the flags of the command it runs.
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  cd "$(dirname "$0")/../.."
  exec "${PYTHON:-python}" -m eval.rounds --help
fi
if [[ $# -lt 2 ]]; then
  echo "usage: bash $0 <prompts file|set> <outdir> [extra eval.rounds args]" >&2
  exit 2
fi
PROMPTS="$1"
OUTDIR="$2"
shift 2
exec "${PYTHON:-python}" -m eval.rounds \
  --prompts "$PROMPTS" --outdir "$OUTDIR" \
  --pretrained_model_name_or_path "${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}" \
  --rounds "${ROUNDS:-2}" --seed "${SEED:-0}" \
  --pairs_args "${PAIRS_ARGS:---num_images 4 --metrics pickscore}" \
  --train_args "${TRAIN_ARGS:---max_train_steps 500}" \
  "$@"
