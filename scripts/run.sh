#!/usr/bin/env bash
# One command from a fresh clone to a result: makes .venv, installs autoscale (a real
# wheel, not an editable install, so the autoscale.passes / autoscale.kernels mapping is
# what users get), then runs the demo sweep or the tests.
#
#   bash scripts/run.sh demo     # tune examples/gpt.py -> plan.json + results table
#   bash scripts/run.sh test     # ruff + the default (fast, CPU-only) test suite
#   bash scripts/run.sh test -m slow    # extra pytest arguments are passed through
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

cmd=${1:-test}
shift || true
case "$cmd" in
  demo)
    exec .venv/bin/autoscale tune examples/gpt.py --budget 32MiB --trials 10 --out plan.json "$@"
    ;;
  test)
    .venv/bin/ruff check .
    exec .venv/bin/pytest "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh demo|test [args]" >&2
    exit 2
    ;;
esac
