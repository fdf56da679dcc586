#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole CPU test suite; GPU tests in tests/gpu skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
