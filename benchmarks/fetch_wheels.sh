#!/usr/bin/env bash
# Run on a machine with network BEFORE a GPU session: downloads the wheels that the GPU machine
# lacks (it has no network) into .whl/, which benchmarks/device_check.sh installs to /tmp/site.
# fla (fla-core, the ops package of flash-linear-attention) is the side-by-side baseline for the
# retention benchmark; it needs only einops, which the GPU machine has. Python 3.12 there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "fla-core==${FLA_VERSION:-0.6.0}"
ls -la .whl
echo "now: device run with carry=['.whl'] and command 'bash benchmarks/device_check.sh'"
