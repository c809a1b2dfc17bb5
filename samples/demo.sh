#!/usr/bin/env bash
# The whole job on a tiny sample family: install, build the family (trained locally on
# text that ships with every machine, no downloads), plan, show, apply, check the output.
# Each step says how long it took, and the end how long the whole demo took on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

timed() {  # timed LABEL COMMAND...: run it, then say how long it took
  local label=$1 t=$SECONDS
  shift
  echo "== $label" >&2
  "$@"
  echo "== $label: $((SECONDS - t)) s" >&2
}

timed "install" bash scripts/install.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
FAMILY=samples/family
OUT=${OUT:-samples/out}
mkdir -p "$OUT"
if [ ! -f "$FAMILY/base/config.json" ]; then
  timed "build the sample family (trains a tiny base and three fine-tunes, once)" \
    "$PY" samples/tiny_family.py "$FAMILY"
fi
recipe=${1:-samples/recipes/ties.yaml}
name=$(basename "$recipe" .yaml)
# The demo re-creates its plan on every run.
timed "mergeplan plan" mergeplan plan "$recipe" -o "$OUT/$name.plan" --force
timed "mergeplan show" mergeplan show "$OUT/$name.plan"
timed "mergeplan validate --inputs" mergeplan validate "$OUT/$name.plan" --inputs
timed "mergeplan apply" mergeplan apply "$OUT/$name.plan" "$OUT/$name" --force
timed "evaluate the merge" "$PY" samples/evaluate.py "$FAMILY" "$OUT/$name"
total=$((SECONDS - start))
echo "demo done in $((total / 60)) min $((total % 60)) s"
cat <<EOF
next:
  mergeplan review $OUT/$name.plan     # look at every decision in a terminal UI, edit, save (? lists the keys)
  mergeplan diff $OUT/$name.plan OTHER.plan   # what an edited copy changed, per layer and field
EOF
