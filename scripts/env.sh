# Sourced by the README commands: creates ./.venv (Python 3.11) and installs the project into it,
# idempotently. torch is pinned to the CPU build that lies on disk here; set USE_TORCH_SPEC to change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
stamp=".venv/.use-deps-$(cat pyproject.toml setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies into .venv"
  "$VPY" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$VPY" -m pip install -q "${USE_TORCH_SPEC:-torch==2.13.0}"
  "$VPY" -m pip install -q numpy "triton>=3.6" tqdm safetensors scikit-learn matplotlib \
      pytest hypothesis pytest-xdist ninja setuptools wheel
  touch "$stamp"
fi
# Rebuild the extension only when csrc/ or the build files changed.
src_hash=$(cat setup.py $(find csrc -type f | sort) | sha1sum | cut -c1-12)
if [ ! -f ".venv/.use-build-$src_hash" ] || ! "$VPY" -c "import use_kernels._C" 2>/dev/null; then
  echo "[setup] building use_kernels._C (pip install --no-build-isolation -e .)"
  MAX_JOBS="${MAX_JOBS:-2}" "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  rm -f .venv/.use-build-*; touch ".venv/.use-build-$src_hash"
fi
# Idle OpenMP threads sleep instead of spinning: on a small shared machine spinning threads slowed
# the chunkwise CPU path 10-100x (measured while other jobs ran).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PATH="$ROOT/.venv/bin:$PATH"
