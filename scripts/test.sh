#!/usr/bin/env bash
# The test suite on both megatron-core lines, each in its own venv (made if missing):
# 0.19.2 (.venv) and 0.16.1 (.venv-mcore0.16). Each run also gets the other line's Python, for
# the tests that save a checkpoint with one release and grow it with the other. A third run
# is the Megatron-Bridge tests and `eval`'s (lm-eval 0.4.13) in .venv-bridge (megatron-bridge 0.6.2;
# they skip elsewhere).
#   bash scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
# The installs wait mostly on the disk and the package index, so they overlap: both lines' venvs
# at once, then the Bridge venv while the first line's tests run (its log is printed if it fails).
logs=$(mktemp -d)
setup() { bash scripts/setup_venv.sh "$1" >"$logs/$1.log" 2>&1 || { cat "$logs/$1.log" >&2; return 1; }; }
setup 0.19 & first=$!
setup 0.16 & second=$!
wait "$first"; wait "$second"
setup bridge & bridge=$!
status=0
for run in ".venv .venv-mcore0.16" ".venv-mcore0.16 .venv"; do
  read -r venv other <<<"$run"
  version=$("$venv/bin/python" -c "from importlib.metadata import version; print(version('megatron-core'))")
  echo "=== megatron-core $version ($venv)"
  MEGATRON_RECYCLE_OTHER_PYTHON="$PWD/$other/bin/python" "$venv/bin/python" -m pytest tests -q "$@" \
    || status=1
done
wait "$bridge"
echo "=== megatron-bridge 0.6.2, lm-eval 0.4.13 (.venv-bridge)"
.venv-bridge/bin/python -m pytest tests/test_bridge*.py tests/test_hf_eval.py -q "$@" || status=1
rm -rf "$logs"
exit $status
