#!/usr/bin/env bash
# Download exactly the wheels the GPU machine's image lacks, for ITS Python (3.12, x86-64), into
# bench/wheels/ (git-ignored; carried to the device with the `run` tool's carry list and
# installed by bench/gpu_check.sh). Versions are the ones this repository is tested with.
#
# The device image (.library/device/KINDS.md) has torch, transformers, accelerate, peft,
# safetensors, timm, huggingface-hub, regex, tqdm, pillow, but not:
#   diffusers                         models, pipelines (everything)
#   open_clip_torch, ftfy, wcwidth    the hpsv2 / clip scorers
#   image-reward, fairscale, clip-anytorch   the imagereward scorer (BLIP of the package)
#   datasets, dill, multiprocess      the training loop's data path (smoke runs)
#   bitsandbytes                      --use_8bit_adam (has its CUDA 13.0 library)
# fairscale publishes no wheel (sdist only, pure Python): it is built here with `pip wheel`.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
DEST=wheels
mkdir -p "$DEST"
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
WHEELS=(
  diffusers==0.42.1
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  image-reward==1.5 clip-anytorch==2.6.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  bitsandbytes==0.50.2
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${WHEELS[@]}"
if ! compgen -G "$DEST/fairscale-0.4.13-*.whl" >/dev/null; then
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" fairscale==0.4.13
fi
ls -l "$DEST"
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total %.1f MiB of wheels (carry limit: 64 MiB with the working tree)\n", $1 / 1048576}'
