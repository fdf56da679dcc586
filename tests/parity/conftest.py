"""Every parity test needs the reference environment: without it each one errors with the
instruction to run scripts/setup.sh (the same in every file), never a silent skip."""

import pytest

from fastlora_jax.testing import refenv


@pytest.fixture(autouse=True, scope="session")
def reference_environment() -> None:
    refenv.require_refenv()
