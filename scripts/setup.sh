#!/usr/bin/env bash
# Create .venv beside this checkout and install layerswap-fast into it (editable, C++ core built).
# `--test` adds the test extra: torch (the local CPU build, pinned so pip never pulls CUDA wheels),
# triton (its interpreter runs the kernels on the CPU), transformers, safetensors, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
extras=""
if [ "${1:-}" = "--test" ]; then
  $PIP install -q torch==2.13.0
  extras="[test]"
fi
$PIP install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
$PIP install -q --no-build-isolation -e ".${extras}"
# The editable install's loader never writes bytecode caches, so every run of the CLI would
# compile the package from source again (~30 ms of a ~0.1 s start): write them once here.
.venv/bin/python -m compileall -q layerswap_fast > /dev/null
