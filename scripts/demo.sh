#!/usr/bin/env bash
# The main job, end to end on the embedded synthetic data: set up .venv (idempotent), train a small
# USE model (FEP + SUP), then embed users statefully and evaluate (Re-ID + classification).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN="${USE_RUN_DIR:-runs/default}"
echo "== 1/2 use-train: a small model on the synthetic default data =="
use-train --output-dir "$RUN" --overwrite "$@"
echo "== 2/2 use-eval: stateful embeddings, Re-ID and classification =="
use-eval --model "$RUN" --out "$RUN/eval"
