#!/usr/bin/env bash
# C++ checks of the segment-gathering extension, no Python build needed:
#   1. configure + build the torch-free core and its unit tests into build/cmake, run ctest;
#   2. compile the CUDA kernels with nvcc for sm_90 when a CUDA toolkit exists (GPU or not), and
#      run the kernel test when a GPU is present (ctest reports it skipped otherwise);
#   3. when torch is importable: syntax-check the torch glue of the CUDA build
#      (csrc/gather_segments_cuda.cpp + bindings.cpp with USE_KERNELS_WITH_CUDA), which a CPU-only
#      setup.py build never compiles.
# Usage: scripts/cpp_check.sh            (CMAKE=..., PYTHON=..., JOBS=... to override)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CMAKE="${CMAKE:-cmake}"
JOBS="${JOBS:-2}"
BUILD=build/cmake

mkdir -p build
echo "== configure ($($CMAKE --version | head -n1))"
$CMAKE -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo ${CMAKE_ARGS:-} >"$BUILD.configure.log" 2>&1 \
  || { mkdir -p "$(dirname "$BUILD")"; cat "$BUILD.configure.log"; exit 1; }
echo "== build"
$CMAKE --build "$BUILD" -j "$JOBS" 2>&1 | grep -E "error|warning|Built target" || true
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "build failed"; exit 1; }

echo "== ctest"
(cd "$BUILD" && ctest --output-on-failure)

mode="$(cat "$BUILD/cuda_mode.txt")"
case "$mode" in
  cmake:*)    echo "CUDA: compile-checked csrc/cuda/gather_segments.cu for sm_90 with CMake's CUDA support (nvcc ${mode#cmake:})";;
  fallback:*) echo "CUDA: compile-checked csrc/cuda/gather_segments.cu for sm_90 with ${mode#fallback:} -c (fallback)";;
  *)          echo "CUDA: NOT compile-checked (no CUDA toolkit / nvcc found)";;
esac

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || true)"
if [ -n "$PY" ] && "$PY" -c "import torch" 2>/dev/null && [ "${mode}" != "none" ]; then
  TI="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()))')"
  PYI="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # The toolkit's include dir, also when nvcc on PATH is a wrapper script (nvcc reports _HERE_).
  NVCC_BIN="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
  NVCC_DIR="$("$NVCC_BIN" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
  CUDA_INC="$(cd "${NVCC_DIR:-$(dirname "$NVCC_BIN")}/.." && pwd)/include"
  # A CPU-only torch wheel ships the c10/cuda headers but not their generated config header.
  STUB="$BUILD/stub_include"
  mkdir -p "$STUB/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  STD="$("$PY" -c 'import torch; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); print("c++20" if v >= (2, 13) else "c++17")')"
  g++ -std="$STD" -fsyntax-only -Wall -Werror -Wno-error=c++20-extensions -DUSE_KERNELS_WITH_CUDA \
      $TI -idirafter "$STUB" -I"$CUDA_INC" -I"$PYI" -Icsrc \
      csrc/gather_segments_cuda.cpp csrc/bindings.cpp csrc/gather_segments_cpu.cpp
  echo "torch glue (CUDA build): syntax-checked against torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "torch glue (CUDA build): not checked (no torch or no CUDA toolkit)"
fi
