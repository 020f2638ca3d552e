#!/usr/bin/env bash
# The demo: MovieLens-100K with rendered posters on the tiny LLaVA, end to end.
#   prepare -> SFT -> HaNoRec DPO (--hardness dynamic --noise logits) -> evaluate (4 protocols)
#   -> most-popular and SASRec on the same splits -> one report with plots.
# Run through `make demo` (which sets up .venv and the data first), or directly:
#   CONFIG=configs/demo.yaml bash recipes/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/demo.yaml}
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/demo}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "prepare MovieLens-100K (splits, 4 protocols, preference pairs)"
$PY -m hanorec.data prepare --config "$CONFIG"
PREPARED=$($PY -c "from hanorec.data.cli_args import parse_data_cli; c = parse_data_cli(['--config', '$CONFIG']); print(c.path(c.output_dir))")

step "stage 1: SFT"
$PY -m hanorec.sft --config "$CONFIG" --run-dir "$RUN"

step "stage 2: HaNoRec DPO (hardness dynamic, noise logits)"
$PY -m hanorec.dpo --config "$CONFIG" --run-dir "$RUN" --hardness dynamic --noise logits

step "evaluate the SFT and the DPO model on every protocol"
$PY -m hanorec.evaluate --config "$CONFIG" --run-dir "$RUN" --checkpoint "$RUN/sft/final" --name sft
$PY -m hanorec.evaluate --config "$CONFIG" --run-dir "$RUN" --checkpoint "$RUN/dpo/final" --name dpo
$PY -m hanorec.evaluate compare "$RUN/eval/sft" "$RUN/eval/dpo"

step "classic baselines on the same candidates: most-popular and SASRec"
$PY -m hanorec.baselines --prepared-dir "$PREPARED" --protocol candidates --out "$RUN/baselines" \
    --sasrec-epochs 60 --sasrec-eval-every 10 --sasrec-patience 2

step "report"
$PY -m hanorec.summary --run-dir "$RUN"
printf '\ndemo finished in %ss\n' "$(( $(date +%s) - start ))"
