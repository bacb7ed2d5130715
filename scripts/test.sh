#!/usr/bin/env bash
# The test suite: sets up .venv (idempotent), then the C++ core tests + CUDA compile check (CMake,
# ctest), then the Python tests (Triton kernels run under the interpreter when there is no GPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "== C++ core tests and CUDA compile check (CMake + ctest) =="
bash scripts/cpp_check.sh
echo "== Python tests =="
# Two workers: the Triton interpreter is CPU-bound and single-threaded.
python -m pytest tests -q -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
