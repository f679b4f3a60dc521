#!/usr/bin/env bash
# Evaluate an SD1.5 UNet as the paper does: generate one image per prompt of papv2, hpsv2 and
# partiprompts (Euler, 50 steps, cfg 7.5, seed 0, 512x512) and score them with the five metrics.
#
#   bash scripts/eval/test_sd15.sh runs/x/checkpoint-2000/unet.pth [extra eval.generate args]
#   bash scripts/eval/test_sd15.sh runs/x/checkpoint-2000/            # a UNet folder works too
#   bash scripts/eval/test_sd15.sh base                               # the base model itself
#
# Outputs go beside the UNet: $(dirname unet.pth)/eval_sd15/ (a folder argument: inside it;
# `base`: outputs/eval_base_sd15/), one manifest + image folder per prompt set, named as the
# reference ({set}_seed{S}_{H}x{W}_{steps}s_{cfg}cfg.json), the per-image scores and summaries of
# eval.score beside each manifest, and summary_*.json over all sets. Rerunning resumes.
# SEEDS=0,1,2 generates every set once per seed (one manifest per seed, named as above); compare
# them with test_vs.sh --json_a A_seed0.json A_seed1.json ... (seeds pooled per prompt).
#
# Environment (defaults in brackets):
#   SIZE [512]  STEP [50]  CFG [7.5]  SEEDS [0] (comma list; SEED is the one-seed spelling)
#   BATCH_SIZE [1]  DTYPE [bf16]
#   MODEL_NAME [stable-diffusion-v1-5/stable-diffusion-v1-5]  VAE [auto]
#   SETS [papv2,hpsv2,partiprompts] (set names or prompt files)  METRICS [all] (`none`: no scoring)
#   PROMPTS_FROM [] folder to copy missing paper prompt files from (offline) instead of downloading
#   PROMPTS_DIR [<repo>/prompts] where the prompt sets are looked up and fetched into
#   OUTDIR [see above]  NUM_PROCESSES [number of GPUs] (>1: accelerate launch)
#   DEVICE [auto] scorer device  SCORE_BATCH_SIZE [16]  PYTHON [python]
# test_sdxl.sh, test_sd3.sh and test_flux.sh run this script with EVAL_KIND=sdxl / sd3 / flux
# (their defaults; the SD3 / FLUX family is detected from MODEL_NAME's configs).
set -euo pipefail

KIND="${EVAL_KIND:-sd15}"
case "$KIND" in
  sdxl)
    SIZE="${SIZE:-1024}"
    MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}"
    KIND_FLAG=(--sdxl)
    ;;
  sd3) # SD3.5 Medium's model card: 40 steps, guidance_scale 4.5 (= --cfg 3.5)
    SIZE="${SIZE:-1024}"
    MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-3.5-medium}"
    STEP="${STEP:-40}"
    CFG="${CFG:-3.5}"
    KIND_FLAG=()
    ;;
  flux) # FluxPipeline's defaults: 28 steps, embedded guidance 3.5 (= --cfg 2.5)
    SIZE="${SIZE:-1024}"
    MODEL_NAME="${MODEL_NAME:-black-forest-labs/FLUX.1-dev}"
    STEP="${STEP:-28}"
    CFG="${CFG:-2.5}"
    KIND_FLAG=()
    ;;
  *)
    SIZE="${SIZE:-512}"
    MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
    KIND_FLAG=(--no-sdxl)
    ;;
esac
STEP="${STEP:-50}"
CFG="${CFG:-7.5}"
SEEDS="${SEEDS:-${SEED:-0}}"
BATCH_SIZE="${BATCH_SIZE:-1}"
DTYPE="${DTYPE:-bf16}"
VAE="${VAE:-auto}"
SETS="${SETS:-papv2,hpsv2,partiprompts}"
METRICS="${METRICS:-all}"
DEVICE="${DEVICE:-auto}"
SCORE_BATCH_SIZE="${SCORE_BATCH_SIZE:-16}"
PYTHON="${PYTHON:-python}"

usage="usage: bash $0 <unet.pth | UNet folder | LoRA .safetensors / folder | base> [extra eval.generate args]"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  echo "$usage"
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
UNET="${1:-}"
if [[ -z "$UNET" ]]; then
  echo "$usage" >&2
  exit 1
fi
shift
EXTRA=("$@")

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PROMPTS_DIR="${PROMPTS_DIR:-$REPO/prompts}"

UNET_ARGS=()
if [[ "$UNET" == base ]]; then
  DEFAULT_OUT="outputs/eval_base_${KIND}"
elif [[ -f "$UNET" ]]; then
  UNET="$(cd "$(dirname "$UNET")" && pwd)/$(basename "$UNET")"
  DEFAULT_OUT="$(dirname "$UNET")/eval_${KIND}"
  UNET_ARGS=(--unet_path "$UNET")
elif [[ -d "$UNET" ]]; then
  UNET="$(cd "$UNET" && pwd)"
  DEFAULT_OUT="$UNET/eval_${KIND}"
  UNET_ARGS=(--unet_path "$UNET")
else
  echo "error: $UNET not found ($usage)" >&2
  exit 1
fi
OUT="${OUTDIR:-$DEFAULT_OUT}"  # eval.generate creates it (and removes it again if it fails)

# Paper prompt files missing from prompts/: fetch them (sha256-verified) first.
IFS=',' read -r -a SET_LIST <<< "$SETS"
MISSING=()
for s in "${SET_LIST[@]}"; do
  case "$s" in
    papv2 | hpsv2 | partiprompts) [[ -f "$PROMPTS_DIR/$s.json" ]] || MISSING+=("$s") ;;
  esac
done
if ((${#MISSING[@]})); then
  FETCH=("$PYTHON" -m eval.prompts fetch --sets "$(IFS=,; echo "${MISSING[*]}")" --dest "$PROMPTS_DIR")
  [[ -n "${PROMPTS_FROM:-}" ]] && FETCH+=(--from "$PROMPTS_FROM")
  echo "+ ${FETCH[*]}"
  "${FETCH[@]}"
fi

NUM_PROCESSES="${NUM_PROCESSES:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
if ((NUM_PROCESSES > 1)); then
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_PROCESSES" -m eval.generate)
else
  LAUNCH=("$PYTHON" -m eval.generate)
fi

IFS=',' read -r -a SEED_LIST <<< "$SEEDS"
for seed in "${SEED_LIST[@]}"; do
  if ! [[ "$seed" =~ ^[0-9]+$ ]]; then
    echo "error: SEEDS must be a comma list of integers, got '$SEEDS'" >&2
    exit 2
  fi
done

MANIFESTS=()
for seed in "${SEED_LIST[@]}"; do
  for s in "${SET_LIST[@]}"; do
    GEN_ARGS=(--pretrained_model_name_or_path "$MODEL_NAME" "${KIND_FLAG[@]}" --vae "$VAE"
      "${UNET_ARGS[@]}" --prompts "$s" --prompts_dir "$PROMPTS_DIR" --outdir "$OUT" --size "$SIZE"
      --steps "$STEP" --cfg "$CFG" --seed "$seed" --batch_size "$BATCH_SIZE" --dtype "$DTYPE"
      ${EXTRA[@]+"${EXTRA[@]}"})
    # The manifest's name comes from eval.generate itself (same arguments), not from a log.
    MANIFEST="$("$PYTHON" -m eval.generate "${GEN_ARGS[@]}" --print_manifest_path | tail -n 1)"
    echo "+ ${LAUNCH[*]} ${GEN_ARGS[*]}"
    "${LAUNCH[@]}" "${GEN_ARGS[@]}"
    MANIFESTS+=("$MANIFEST")
  done
done

if [[ "$METRICS" == none ]]; then
  printf 'manifests:\n'
  printf '  %s\n' "${MANIFESTS[@]}"
  exit 0
fi
SUMMARY="$OUT/summary_seed${SEEDS//,/-}_${SIZE}x${SIZE}_${STEP}s_${CFG}cfg.json"
SCORE=("$PYTHON" -m eval.score --manifest "${MANIFESTS[@]}" --metrics "$METRICS"
  --device "$DEVICE" --batch_size "$SCORE_BATCH_SIZE" --summary_out "$SUMMARY")
echo "+ ${SCORE[*]}"
"${SCORE[@]}"
echo "summary: $SUMMARY"
