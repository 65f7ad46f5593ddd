#!/usr/bin/env bash
# Make .venv with the pinned CPU dependencies and megatron-recycle itself (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-ci.txt
.venv/bin/pip install -q -e . --no-deps
