#!/usr/bin/env bash
# One GPU session's worth of checks (< 8 minutes on an H200): build for sm_90, run the GPU tests
# (correctness before any timing), run the GPU benchmarks, print a short table last.
# Usage on the GPU machine (torch + CUDA + Triton preinstalled, no network):
#   bash benchmarks/device_check.sh            # results under $OUT (or benchmarks/results)
# fla for the side-by-side travels as wheels in .whl/ (benchmarks/fetch_wheels.sh fetches them
# beforehand; carry .whl in the device call); they are installed to /tmp/site if present.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" USE_CUDA=1
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
status=0
step() { echo; echo "=== $1 ==="; shift; local t0=$SECONDS; "$@" 2>&1 | tee -a "$OUT/device_check.log"; local rc=${PIPESTATUS[0]}; echo "--- rc=$rc in $((SECONDS - t0))s"; [ $rc -eq 0 ] || status=1; return $rc; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device_check.log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device_check.log"

step "build (sm_90)" "$PY" -m pip install -q --no-build-isolation --no-deps -e . || { echo "build failed: stopping"; exit 1; }
# Correctness first: the CUDA tests (gather op on CUDA, Triton retention on CUDA, model on GPU).
step "GPU tests" timeout 240 "$PY" -m pytest -q -x -m cuda tests -p no:cacheprovider || { echo "GPU tests failed: no timing"; exit 1; }
step "bench_gather (cuda)"    timeout 60  "$PY" benchmarks/bench_gather.py --device cuda --csv "$OUT/gather_cuda.csv"
step "bench_retention (cuda)" timeout 180 "$PY" benchmarks/bench_retention.py --device cuda --csv "$OUT/retention_cuda.csv"
step "bench_train (cuda)"     timeout 90  "$PY" benchmarks/bench_train.py --device cuda --csv "$OUT/train_cuda.csv"
step "bench_embed (cuda)"     timeout 60  "$PY" benchmarks/bench_embed.py --device cuda --csv "$OUT/embed_cuda.csv"

echo; echo "=== summary (CSV files in $OUT) ==="
for f in "$OUT"/*_cuda.csv; do [ -f "$f" ] && { echo "# $(basename "$f")"; column -s, -t < "$f" | head -30; }; done
exit $status
