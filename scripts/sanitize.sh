#!/usr/bin/env bash
# Build the C++ core with AddressSanitizer + UBSan (-DLAYERSWAP_SANITIZE=ON) into build/asan and
# run tests/test_core.py (and the test files given) against that build. The editable install in .venv is left untouched: the
# instrumented module is loaded from build/asan-wheel and put in sys.modules before the tests run.
#
#   bash scripts/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=build/asan-wheel

rm -rf "$OUT"
$PY -m pip wheel -q --no-build-isolation --no-deps -w "$OUT" \
  --config-settings=cmake.define.LAYERSWAP_SANITIZE=ON \
  --config-settings=build-dir=build/asan \
  .
mkdir -p "$OUT/unpacked"
$PY - "$OUT" <<'EOF'
import glob, sys, zipfile
out = sys.argv[1]
(wheel,) = glob.glob(f"{out}/*.whl")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("layerswap_fast/_core") and name.endswith(".so"):
            z.extract(name, f"{out}/unpacked")
EOF
SO=$(ls "$OUT"/unpacked/layerswap_fast/_core*.so)
echo "sanitized core: $SO"

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
# handle_sigbus=0: the core installs its own SIGBUS handler (issue 20: a fault in a mapped input
# becomes a CoreError) and hands every other SIGBUS to the handler it found. Left to ASan, that
# handler is ASan's, which turns the signal into a report and an abort; the tests check that a
# SIGBUS outside the core's mappings still kills the process with SIGBUS, as it would without ASan.
# A bus error is no memory error ASan could explain, so nothing is lost.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:strict_init_order=1:handle_sigbus=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
LD_PRELOAD="$LIBASAN $LIBUBSAN" LSF_SANITIZED_CORE="$SO" exec $PY - "$@" <<'EOF'
import importlib.util
import os
import sys

spec = importlib.util.spec_from_file_location("layerswap_fast._core", os.environ["LSF_SANITIZED_CORE"])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
try:
    import layerswap_fast
    layerswap_fast._core = mod
except Exception as e:  # the Python package may be in flux; test_core only needs _core
    print(f"note: importing layerswap_fast failed ({e!r})", file=sys.stderr)

import pytest

code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_core.py", *sys.argv[1:]])
from layerswap_fast import _core
assert _core is mod, "tests ran against the wrong core"
sys.exit(code)
EOF
