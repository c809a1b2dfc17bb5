#!/usr/bin/env bash
# The whole job on a tiny sample family: install, build the family (trained locally on
# text that ships with every machine, no downloads), plan, show, apply, check the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
FAMILY=samples/family
OUT=${OUT:-samples/out}
mkdir -p "$OUT"
if [ ! -f "$FAMILY/base/config.json" ]; then
  "$PY" samples/tiny_family.py "$FAMILY"
fi
recipe=${1:-samples/recipes/ties.yaml}
name=$(basename "$recipe" .yaml)
mergeplan plan "$recipe" -o "$OUT/$name.plan" --force  # the demo re-creates its plan on every run
mergeplan show "$OUT/$name.plan"
mergeplan validate "$OUT/$name.plan" --inputs
mergeplan apply "$OUT/$name.plan" "$OUT/$name" --force
"$PY" samples/evaluate.py "$FAMILY" "$OUT/$name"
