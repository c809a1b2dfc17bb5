#!/usr/bin/env bash
# Install mergeplan (editable) into the current Python environment.
# torch: an already installed build (CPU or CUDA) is kept. Otherwise torch==2.13.0 is
# asked for explicitly: on a GPU box PyPI serves its CUDA build, and on machines that
# carry a local CPU wheel of that version pip takes it instead of a multi-GB download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-dev}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.3"
fi
"$PY" -m pip install -q -e ".[${extras}]"
