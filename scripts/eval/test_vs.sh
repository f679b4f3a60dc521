#!/usr/bin/env bash
# A/B comparison of generation manifests: score both with the five metrics (cached scores are
# reused), per-metric win rates with 95% intervals, p-values and macro/micro averages, an HTML +
# PNG picture report.
#
#   bash scripts/eval/test_vs.sh --json_a A.json --json_b B.json --label_a A --label_b B \
#       [--device cuda] [--batch_size 16] [--outdir D] [--metrics all|pickscore,hpsv2,...]
#   bash scripts/eval/test_vs.sh --json_a A_seed0.json A_seed1.json --json_b B_seed0.json B_seed1.json
#
# Several files after --json_a / --json_b are several seeds (k-th of A against k-th of B, pooled
# per prompt). Any other flag is passed to `python -m eval.compare` (listed below: e.g.
# --num_samples 24, --pair_by_index, --ties_as_loss_for_a, --resamples, weight locations such as
# --hpsv2_checkpoint PATH). Outputs (default <folder of A>/<label_a>_vs_<label_b>/):
# <metric>.json, summary.json, report.html, grid.png; per-image scores beside each manifest
# (<stem>.scores.jsonl/.summary.json). PYTHON overrides the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python}"
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

JSON_A=() JSON_B=() LABEL_A="A" LABEL_B="B" DEVICE="auto" BATCH_SIZE=16 OUTDIR="" METRICS="all"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --json_a|--json_b)
      side="$1"; shift
      while [[ $# -gt 0 && "$1" != --* ]]; do
        if [[ "$side" == --json_a ]]; then JSON_A+=("$1"); else JSON_B+=("$1"); fi
        shift
      done ;;
    --label_a) LABEL_A="$2"; shift 2 ;;
    --label_b) LABEL_B="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --batch_size) BATCH_SIZE="$2"; shift 2 ;;
    --outdir) OUTDIR="$2"; shift 2 ;;
    --metrics) METRICS="$2"; shift 2 ;;
    -h|--help)
      usage
      echo
      echo "The flags of python -m eval.compare (all accepted here):"
      PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m eval.compare --help ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if ((${#JSON_A[@]} == 0 || ${#JSON_B[@]} == 0)); then
  echo "error: --json_a and --json_b are required" >&2
  usage >&2
  exit 2
fi

ARGS=(--json_a "${JSON_A[@]}" --json_b "${JSON_B[@]}" --label_a "$LABEL_A" --label_b "$LABEL_B"
      --device "$DEVICE" --batch_size "$BATCH_SIZE" --metrics "$METRICS")
[[ -n "$OUTDIR" ]] && ARGS+=(--outdir "$OUTDIR")

# eval.compare scores missing metrics (eval.score logic), compares, writes the report and prints
# the summary table; results are files, the printout is for people.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m eval.compare "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
