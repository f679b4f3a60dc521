#!/usr/bin/env bash
# First run on any laptop: a CPU reproduction (no GPU, no download, a few minutes on 2 cores) of
# the paper's pathology (Diffusion-DPO raises the winner's error while the margin grows) and of
# the SDPO safeguard's fix, for Diffusion-DPO, DSPO and DMPO. Extra flags go to
# experiments.toy (python -m experiments.toy --help), e.g. --seeds 5 --beta 2000 --lr 1e-3.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$PYTHON" -m experiments.toy --outdir "${OUTDIR:-runs/toy}" "$@"
