#!/usr/bin/env bash
# Set up a virtual environment from scratch and run the whole test suite.
# Real-data tests use $BNLAB_DATA; when it is unset and the shared CIFAR-10
# materializer sits beside this checkout, the data is written to .data/ first.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# torch pinned to the CPU build the test machines carry; any torch >= 2.4 works for users.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"

materializer=../shared/data/cifar10/materialize.py
if [ -z "${BNLAB_DATA:-}" ] && [ -f "$materializer" ]; then
    .venv/bin/python "$materializer" .data
    export BNLAB_DATA="$PWD/.data"
fi

.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q
