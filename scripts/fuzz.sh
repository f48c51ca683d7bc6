#!/usr/bin/env bash
# The long fuzz run, by hand: the same properties as tests/test_fuzz.py with many more examples
# (100000 each by default: tens of minutes on 2 cores). Pass LAYERSWAP_FUZZ_EXAMPLES to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
export LAYERSWAP_FUZZ_EXAMPLES=${LAYERSWAP_FUZZ_EXAMPLES:-100000}
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py "$@"
