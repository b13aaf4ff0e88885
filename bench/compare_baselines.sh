#!/usr/bin/env bash
# A small real comparison on CPU: SFT vs plain SD vs UniSD* on CoS-E with SmolLM2-135M-Instruct,
# scored on validation questions with PPL_ret / PPL_fit against the base model.
#   UNISD_DATA_DIR=../shared/data bash bench/compare_baselines.sh OUT [TRAIN_EXAMPLES] [EVAL_QUESTIONS] [STEPS]
set -euo pipefail
out=${1:?output folder}; n=${2:-64}; q=${3:-100}; steps=${4:-16}
: "${UNISD_DATA_DIR:?set UNISD_DATA_DIR to a folder with cos_e/v1.11/train.jsonl}"
mkdir -p "$out"
head -n "$n" "$UNISD_DATA_DIR/cos_e/v1.11/train.jsonl" > "$out/cos_e-train.jsonl"
mkdir -p "$out/data/cos_e/v1.11"
cp "$out/cos_e-train.jsonl" "$out/data/cos_e/v1.11/train.jsonl"
cp "$UNISD_DATA_DIR/cos_e/v1.11/validation.jsonl" "$out/data/cos_e/v1.11/validation.jsonl"
export UNISD_DATA_DIR="$out/data" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
common=(--model smollm2-135m --data cos_e --max-steps "$steps" --batch-size 4 --max-new-tokens 64 --lr 5e-5 --overwrite)
for preset in sft sd unisd-star; do
  extra=(); [ "$preset" = unisd-star ] && extra=(-o contrast.max_new_tokens=48)
  start=$(date +%s)
  unisd train --preset "$preset" "${common[@]}" "${extra[@]}" --out "$out/$preset" 2>&1 | grep -v "it/s" | tail -1
  echo "$preset: trained in $(( $(date +%s) - start )) s"
done
unisd eval --model base=smollm2-135m --model sft="$out/sft" --model sd="$out/sd" --model unisd-star="$out/unisd-star" \
  --tasks unisd_cose --limit "$q" --retention --base smollm2-135m --out "$out/eval" --batch-size 8
