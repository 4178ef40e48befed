#!/usr/bin/env bash
# Install kvstore (building the Cython kernels) with its test extras, then run the whole
# suite with the compiled kernels, and the `pure` selection (tests/conftest.py: PURE, what
# the pure-Python twins change) again with KVSTORE_PURE=1. Each run prints its slowest
# tests, so a test drifting towards its timeout shows before it fails. A run that selects
# nothing fails (pytest exits 5).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[test]'
python -c 'import kvstore; s = kvstore.status(); assert s["implementation"] == "native", s; print("kernels:", s)'
python -m pytest -q --durations=15 "$@"
KVSTORE_PURE=1 python -m pytest -q --durations=15 -m pure "$@"
