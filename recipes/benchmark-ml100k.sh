#!/usr/bin/env bash
# The quality benchmark on MovieLens-100K (rendered posters) with the smollm2-llava backbone:
#   popularity, SASRec, SFT, SFT text-only, DPO, S-DPO, SimPO, HaNoRec (static, dynamic, + NoDO,
#   + NoDO without reference), + BPO blind negatives, R²ec/RecPO — 3 seeds, protocols candidates
#   (20 candidates) and hit1 (R²ec and the baselines also on full), paired tests, training cost.
# Every stage is resumable: rerun the same command after an interruption and finished stages are
# skipped. Results: benchmarks/results/ml100k.md (+ PNGs); run folders: runs/benchmark-ml100k/.
#   bash recipes/benchmark-ml100k.sh                      # CPU budget (2 cores: a few hours)
#   bash recipes/benchmark-ml100k.sh --full               # GPU: the recipe's steps, every user
#   bash recipes/benchmark-ml100k.sh --methods sft,dpo,hanorec-nodo --seeds 0
# Needs the data and the backbone: `make data models` (done by `make test` / `make demo` too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/ml100k-smollm2.yaml}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/quality.py --config "$CONFIG" --seeds "${SEEDS:-0,1,2}" --out benchmarks/results \
    --run-root runs/benchmark-ml100k "$@"
