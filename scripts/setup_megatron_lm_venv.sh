#!/usr/bin/env bash
# Make the Python >= 3.12 venv that runs Megatron-LM's training code (pretrain_gpt.py through
# megatron_recycle.launch, and the tests that do) with a Megatron-LM checkout (idempotent).
#   bash scripts/setup_megatron_lm_venv.sh [PATH_TO_MEGATRON_LM]
# PYTHON: the interpreter to make it with (default: python3.12); VENV: where (default:
# .venv-megatron-lm). With a checkout, its `megatron` package is the venv's megatron-core (a
# .pth entry) and its C++ dataset helpers are built for this Python; without one,
# megatron-core 0.19.2 is installed. Then, for the tests:
#   MEGATRON_LM_PATH=PATH_TO_MEGATRON_LM .venv-megatron-lm/bin/python -m pytest tests/test_megatron_lm_pretrain.py
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.12}"
venv="${VENV:-.venv-megatron-lm}"
checkout="${1:-}"
if [ -n "$checkout" ] && [ ! -f "$checkout/pretrain_gpt.py" ]; then
  echo "$0: $checkout: not a Megatron-LM checkout (no pretrain_gpt.py)" >&2; exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  echo "$0: $python: need Python >= 3.12 (Megatron-LM's training code from core_v0.18 on); set PYTHON" >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r requirements/megatron-lm.txt
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -n "$checkout" ]; then
  checkout=$(cd "$checkout" && pwd)
  "$venv/bin/pip" uninstall -q -y megatron-core 2>/dev/null || true
  echo "$checkout" > "$site/megatron-lm-checkout.pth"
  make -s -C "$checkout/megatron/core/datasets" \
    LIBEXT="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" \
    CPPFLAGS="$("$venv/bin/python" -m pybind11 --includes)"
else
  rm -f "$site/megatron-lm-checkout.pth"
  "$venv/bin/pip" install -q --no-deps megatron-core==0.19.2
fi
"$venv/bin/pip" install -q -e . --no-deps
echo "$venv"
