#!/usr/bin/env bash
# Install kvstore (building the Cython kernels) with its test extras, then run the whole
# suite twice: with the compiled kernels, and with KVSTORE_PURE=1 (the pure-Python twins).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[test]'
python -c 'import kvstore; s = kvstore.status(); assert s["implementation"] == "native", s; print("kernels:", s)'
python -m pytest -q "$@"
KVSTORE_PURE=1 python -m pytest -q "$@"
