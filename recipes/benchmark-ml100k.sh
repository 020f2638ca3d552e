#!/usr/bin/env bash
# The quality benchmark on MovieLens-100K with the learning recipe (configs/ml100k-smollm2.yaml:
# smollm2-llava with collaborative item tokens, a user token, the ranking head, pooled posters):
#   most-popular and SASRec; SFT; from it DPO, HaNoRec dynamic + NoDO, the same without a
#   reference, S-DPO (K = 3), HaNoRec dynamic without noise, SimPO; the SFT ablations (no posters,
#   no collaborative tokens); HaNoRec static, NoDO on LoRA, IPO, cDPO, the precomputed reference,
#   BPO blind negatives and R²ec/RecPO. All 943 test users on candidates, hit1 and hit3; SFT and
#   HaNoRec also with the posters removed at test (the blind gap); 3 seeds; paired tests against
#   DPO, SFT and SASRec (Holm). The stages run method by method (every seed of one method before
#   the next), so a grid stopped early is missing its last methods, never users or seeds.
# Every stage is resumable: rerun the same command after an interruption and finished stages are
# skipped. Results: benchmarks/results/ml100k.md (+ PNGs); run folders: runs/benchmark-ml100k/.
#   bash recipes/benchmark-ml100k.sh                      # CPU budget (2 cores: ~4.5 h for all 18 rows)
#   bash recipes/benchmark-ml100k.sh --full               # GPU: the recipe's steps
#   bash recipes/benchmark-ml100k.sh --methods sft,dpo,hanorec-nodo --seeds 0
# Needs the data and the backbone: `make data models` (done by `make test` / `make demo` too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/ml100k-smollm2.yaml}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/quality.py --config "$CONFIG" --seeds "${SEEDS:-0,1,2}" --out benchmarks/results \
    --run-root runs/benchmark-ml100k "$@"
