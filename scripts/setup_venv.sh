#!/usr/bin/env bash
# Make a venv with the pinned CPU dependencies, one megatron-core line and megatron-recycle
# itself (idempotent).
#   bash scripts/setup_venv.sh          # .venv: megatron-core 0.19.2 (current)
#   bash scripts/setup_venv.sh 0.16     # .venv-mcore0.16: megatron-core 0.16.1
#   bash scripts/setup_venv.sh bridge   # .venv-bridge: megatron-core 0.19.2 + megatron-bridge 0.6.2
set -euo pipefail
cd "$(dirname "$0")/.."
line="${1:-0.19}"
case "$line" in
  0.19) venv=.venv ;;
  0.16) venv=.venv-mcore0.16 ;;
  bridge) venv=.venv-bridge ;;
  *) echo "usage: $0 [0.19|0.16|bridge]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
if [ "$line" = bridge ]; then
  "$venv/bin/pip" install -q -r requirements/bridge.txt
  "$venv/bin/pip" install -q --no-deps --ignore-requires-python megatron-core==0.19.2 megatron-bridge==0.6.2
  "$venv/bin/pip" install -q --no-deps nvidia-modelopt==0.47.0  # imported by Bridge's checkpointing
else
  "$venv/bin/pip" install -q -r "requirements/mcore-$line.txt"
fi
if [ "$line" = 0.19 ]; then
  "$venv/bin/pip" install -q --no-deps --ignore-requires-python megatron-core==0.19.2
fi
"$venv/bin/pip" install -q -e . --no-deps
echo "$venv"
