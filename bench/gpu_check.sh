#!/usr/bin/env bash
# The GPU run of issue 14 in one command (see bench/gpu_check.py and bench/README.md):
#   bash bench/gpu_check.sh [--budget_s 450] [--jobs sd15_,smoke_]   # results under $OUT
#   bash bench/gpu_check.sh --cpu-dry-run --out /tmp/dry             # tiny models, this CPU
# On the GPU machine it first installs the wheels carried in bench/wheels/ (made by
# bench/fetch_wheels.sh: what the device image lacks) into a private folder, so nothing of the
# image changes; the dry run uses the local environment as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DRY=0
for a in "$@"; do [[ "$a" == "--cpu-dry-run" || "$a" == "--cpu_dry_run" ]] && DRY=1; done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $DRY == 1 ]]; then
  exec "$PY" -m bench.gpu_check "$@"
fi
if compgen -G "bench/wheels/*.whl" >/dev/null; then
  SITE="${SDPO_WHEEL_SITE:-/tmp/sdpo_site}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" bench/wheels/*.whl || { echo "gpu_check.sh: wheel install failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no bench/wheels/*.whl (run bench/fetch_wheels.sh and carry bench/wheels)" >&2
fi
if [[ -z "${OUT:-}" ]]; then
  echo "gpu_check.sh: set \$OUT (the device tool does) or run python -m bench.gpu_check --out DIR" >&2
  exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  >"$OUT/nvidia-smi.txt" 2>&1
"$PY" -m bench.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
