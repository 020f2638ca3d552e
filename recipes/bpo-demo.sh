#!/usr/bin/env bash
# BPO on the embedded default (MovieLens-100K, rendered posters, tiny LLaVA): blind negatives.
#   SFT (reused from runs/demo when present) -> blind answers of the SFT model (`hanorec.bpo
#   generate`) -> DPO with the blind items as negatives -> evaluate the SFT and the BPO model
#   with and without images (`--blind true`: the with-images minus without-images gap per
#   metric, with a paired bootstrap interval) -> paired comparison of the two.
#   CONFIG=configs/demo.yaml RUN=runs/bpo-demo bash recipes/bpo-demo.sh
# Knobs: SFT_RUN (where an SFT model is looked for), MAX_PAIRS (training pairs answered blind
# and trained on: the same seeded subset in both stages), BLIND_RATIO, and extra flags for each
# stage in SFT_FLAGS, BPO_FLAGS, DPO_FLAGS, EVAL_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/demo.yaml}
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/bpo-demo}
SFT_RUN=${SFT_RUN:-runs/demo}
MAX_PAIRS=${MAX_PAIRS:-240}
BLIND_RATIO=${BLIND_RATIO:-1.0}
EVAL_FLAGS=${EVAL_FLAGS:---eval-protocols candidates,hit1}
# The tiny random-weight LLaVA's greedy answers rarely name a title (blank on a 20-step SFT), so
# the demo takes the blind pick by likelihood over the candidates; BPO_FLAGS="" generates instead.
BPO_FLAGS=${BPO_FLAGS---bpo-pick score}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "prepare MovieLens-100K (splits, protocols, preference pairs)"
$PY -m hanorec.data prepare --config "$CONFIG"

SFT="$SFT_RUN/sft/final"
if [ -f "$SFT/hanorec.json" ]; then
    step "stage 1: SFT — reusing $SFT"
else
    SFT="$RUN/sft/final"
    step "stage 1: SFT into $RUN"
    # shellcheck disable=SC2086
    $PY -m hanorec.sft --config "$CONFIG" --run-dir "$RUN" ${SFT_FLAGS:-}
fi

step "BPO: the SFT model answers the $MAX_PAIRS training prompts with their images removed"
# shellcheck disable=SC2086
$PY -m hanorec.bpo generate --config "$CONFIG" --run-dir "$RUN" --checkpoint "$SFT" \
    --max-train-pairs "$MAX_PAIRS" --bpo-out "$RUN/bpo/blind" $BPO_FLAGS

step "stage 2: DPO with blind negatives (ratio $BLIND_RATIO)"
# shellcheck disable=SC2086
$PY -m hanorec.dpo --config "$CONFIG" --run-dir "$RUN" --sft-checkpoint "$SFT" --max-train-pairs "$MAX_PAIRS" \
    --blind-negatives "$RUN/bpo/blind" --blind-ratio "$BLIND_RATIO" ${DPO_FLAGS:-}

step "evaluate the SFT and the BPO model with and without images"
# shellcheck disable=SC2086
$PY -m hanorec.evaluate --config "$CONFIG" --run-dir "$RUN" --checkpoint "$SFT" --name sft --blind true $EVAL_FLAGS
# shellcheck disable=SC2086
$PY -m hanorec.evaluate --config "$CONFIG" --run-dir "$RUN" --checkpoint "$RUN/dpo/final" --name bpo --blind true $EVAL_FLAGS
$PY -m hanorec.evaluate compare "$RUN/eval/sft" "$RUN/eval/bpo"

step "blind answers and the modality gap"
cat "$RUN/bpo/blind/manifest.json"
for name in sft bpo; do printf '\n----- %s -----\n' "$name"; cat "$RUN/eval/$name/report.md"; done
printf '\nBPO demo finished in %ss\n' "$(( $(date +%s) - start ))"
