#!/usr/bin/env bash
# The long fuzz run, by hand: the properties of tests/test_fuzz.py (parsers, core range checks)
# and of tests/test_cli_fuzz.py (every CLI command on mutated inputs, in a subprocess) with many
# more examples than CI, then the number of CLI cases run per command.
#
#   scripts/fuzz.sh                  # 100000 parser examples, 2000 CLI examples per property
#   scripts/fuzz.sh --minutes 30     # random examples until 30 minutes have passed (in rounds)
#   scripts/fuzz.sh --collect FILE   # CLI failures are appended to FILE (JSON lines) and the
#                                    # run goes on, to collect every class in one run
# LAYERSWAP_FUZZ_EXAMPLES and LAYERSWAP_CLI_FUZZ_EXAMPLES override the counts; other arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --collect) export LAYERSWAP_CLI_FUZZ_FINDINGS=$(realpath "$2"); shift 2 ;;
    *) break ;;
  esac
done
counts=$(mktemp -t layerswap-cli-fuzz-counts.XXXXXX.json)
rm -f "$counts"
export LAYERSWAP_CLI_FUZZ_COUNTS=$counts
report() {
  echo "CLI fuzz cases run per command:"
  if [[ -f $counts ]]; then
    .venv/bin/python -c 'import json, sys; c = json.load(open(sys.argv[1]))
for k, v in c.items(): print(f"  {k:<26} {v}")
print("  %-26s %d" % ("total", sum(c.values())))' "$counts"
  else
    echo "  none"
  fi
}
trap report EXIT
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [[ -z $minutes ]]; then
  LAYERSWAP_FUZZ_EXAMPLES=${LAYERSWAP_FUZZ_EXAMPLES:-100000} "${pytest[@]}" tests/test_fuzz.py "$@"
  LAYERSWAP_CLI_FUZZ_EXAMPLES=${LAYERSWAP_CLI_FUZZ_EXAMPLES:-2000} "${pytest[@]}" tests/test_cli_fuzz.py "$@"
  exit
fi
# Timed: rounds of random examples (a fresh seed each round) until the time is up; a round
# is about five minutes on two cores, so the last one may run past the end by that much.
export LAYERSWAP_CLI_FUZZ_RANDOM=1
end=$(( $(date +%s) + minutes * 60 ))
while (( $(date +%s) < end )); do
  LAYERSWAP_FUZZ_EXAMPLES=${LAYERSWAP_FUZZ_EXAMPLES:-5000} "${pytest[@]}" tests/test_fuzz.py "$@"
  LAYERSWAP_CLI_FUZZ_EXAMPLES=${LAYERSWAP_CLI_FUZZ_EXAMPLES:-40} "${pytest[@]}" tests/test_cli_fuzz.py "$@"
done
