#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole CPU test suite; GPU tests in tests/gpu skip without a GPU.
# Two pytest-xdist workers, each taking whole test files (--dist loadfile: a module's fixtures are
# built once, by one worker). Most of the suite is single-threaded XLA compilation and waiting on
# subprocesses, so the 2-core CI machine runs two files at once. Extra arguments go to pytest;
# `-n 0` runs everything in this one process (for -s, --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
