#!/usr/bin/env bash
# Set-up for the README's two commands: makes .venv and installs autoscale with its test
# extras as a real wheel (not an editable install, so the autoscale.passes /
# autoscale.kernels mapping is what users get). Safe to run again: it only installs what
# is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch is pinned to the release autoscale is tested with. pip picks the build for the
# machine (the CUDA build from PyPI on Linux with a GPU driver, a CPU build where the
# local index offers one); pyproject.toml only asks for torch>=2.6, which 2.13.0 meets,
# so the next line installs nothing more.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" \
  2>/dev/null || pip install "torch==2.13.0"
pip install ".[test]"
