#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, Python and the driver (benchmarks/gpu_check.py says what
# it runs and writes):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#
# Installs the project into .venv-gpu: a CUDA torch that is already importable is used as it is (GPU
# machines often carry one, and may be offline); otherwise pip installs the pinned torch==2.13.0 from its
# configured index, where the default Linux build is the CUDA one. The project itself goes in without
# reinstalling torch. --dry-run: the same steps on the CPU (the test suite runs it), in this checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [--dry-run]}
shift
mkdir -p "$out"
if [ "${1:-}" = "--dry-run" ]; then
  exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$out" --dry-run
fi

python=${PYTHON:-python3}
if "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "using the CUDA torch already here: $("$python" -c 'import torch; print(torch.__version__)')"
  "$python" -m venv --system-site-packages .venv-gpu
else
  "$python" -m venv .venv-gpu
  .venv-gpu/bin/pip install --quiet torch==2.13.0
fi
# The project and what it needs but torch; offline, whatever is missing stays missing and the JSON says
# which step failed for it.
.venv-gpu/bin/pip install --quiet --no-build-isolation -e '.[serve,dev]' 2>"$out/pip.log" ||
  .venv-gpu/bin/pip install --quiet --no-build-isolation --no-deps -e . 2>>"$out/pip.log" ||
  echo "could not install the project; running from src/" >&2
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 .venv-gpu/bin/python benchmarks/gpu_check.py "$out"
