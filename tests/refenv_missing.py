"""A pytest plugin (`-p tests.refenv_missing`) that points the reference environment at a path
that does not exist: what a fresh clone sees before scripts/setup.sh. Used by
tests/unit/test_parity_policy.py to check that every parity test then errors."""

import pathlib

from fastlora_jax.testing import refenv


def pytest_configure(config) -> None:
    refenv.REFENV_PYTHON = pathlib.Path("/nonexistent/.refenv/bin/python")
