#!/usr/bin/env bash
# One CUDA check of `--device` (issue 18), under 5 minutes: bare model vs plada's predict and fit paths at 224 px
# in mixed precision, plus Ray with one actor per GPU; writes results/engine_gpu.json (scripts/gpu_check.py).
# Without CUDA it stops at once with exit 2; `scripts/gpu_check.sh --smoke` runs it tiny on any machine.
#   scripts/gpu_check.sh [--smoke] [--out FILE] [--model auto|convnext|resnet50|lite0] [--ray auto|on|off]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # Ray's workers import this checkout's plada too
# 290 s: the 5 minutes the check promises, with room to write the JSON; the script skips sections past --budget
exec timeout --signal=INT --kill-after=10 "${GPU_CHECK_TIMEOUT:-290}" "$py" scripts/gpu_check.py "$@"
