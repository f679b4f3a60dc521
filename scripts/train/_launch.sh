#!/usr/bin/env bash
# Shared launcher of the six reference recipes (scripts/train/{sd15,sdxl}_*.sh); not run directly.
# The recipe exports MODEL_NAME (and VAE, OUTPUT_DIR defaults) and passes its method flags, then
# the user's own arguments, which come last and therefore win.
#
# Environment: MODEL_NAME, DATASET_NAME (hub id, or a local folder of parquet/arrow files),
#   OUTPUT_DIR, VAE (separate VAE; empty for none), NUM_GPUS (default: auto-detected),
#   ACCELERATE_CONFIG (an accelerate config file, e.g. configs/accelerate/deepspeed_zero2.yaml;
#   it then sets the process count instead of NUM_GPUS),
#   PYTHON (default: python), DRY_RUN=1 (print the command instead of running it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python}"
for a in "$@"; do
  if [[ "$a" == -h || "$a" == --help ]]; then
    # --help: the recipe's flags are train.py's (the recipe's own come first, the user's win)
    echo "usage: bash scripts/train/<recipe>.sh [extra train.py flags]   (env: see _launch.sh)"
    echo "recipe flags: ${*/%--help/} ; the flags of train.py:"
    exec "$python" "$repo/train.py" --help
  fi
done
: "${MODEL_NAME:?MODEL_NAME must be set by the recipe}"
DATASET_NAME="${DATASET_NAME:-yuvalkirstain/pickapic_v2}"
: "${OUTPUT_DIR:?OUTPUT_DIR must be set by the recipe}"

if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  if [[ "$NUM_GPUS" == 0 ]]; then
    NUM_GPUS="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  fi
fi

launch=()
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  # The config file decides processes, machines and backend (see configs/accelerate/).
  launch+=(--config_file "$ACCELERATE_CONFIG")
elif (( NUM_GPUS > 1 )); then
  launch+=(--multi_gpu --num_processes "$NUM_GPUS" --num_machines 1 --dynamo_backend no)
elif (( NUM_GPUS == 1 )); then
  launch+=(--num_processes 1 --num_machines 1 --dynamo_backend no)
else
  echo "no GPU found: running on the CPU (very slow at real model sizes)" >&2
  launch+=(--cpu --num_processes 1 --num_machines 1 --dynamo_backend no)
fi

if [[ -d "$DATASET_NAME" ]]; then data=(--train_data_dir "$DATASET_NAME"); else data=(--dataset_name "$DATASET_NAME"); fi
vae=()
[[ -n "${VAE:-}" ]] && vae=(--pretrained_vae_model_name_or_path "$VAE")

# The paper's common settings (effective batch 2048 = 8 GPUs x 8 pairs x 32 accumulation).
cmd=("$python" -m accelerate.commands.launch "${launch[@]}" "$repo/train.py"
  --pretrained_model_name_or_path "$MODEL_NAME" "${vae[@]}" "${data[@]}"
  --output_dir "$OUTPUT_DIR"
  --train_batch_size 8 --gradient_accumulation_steps 32 --max_train_steps 2000
  --lr_scheduler constant_with_warmup --lr_warmup_steps 500 --scale_lr
  --checkpointing_steps 500 --mixed_precision bf16 --allow_tf32
  --use_winner_preserving --dataloader_num_workers 16
  "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
