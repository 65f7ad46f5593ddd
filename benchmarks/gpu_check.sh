#!/usr/bin/env bash
# One GPU check, one command (see benchmarks/gpu_check.py --help):
#   bash benchmarks/gpu_check.sh [--budget-s 480] [--parts a,b] [--python PY] [--dry-run]
# It needs only python3 (3.12 on the GPU machine) with pip: the parts' stack is installed by it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
