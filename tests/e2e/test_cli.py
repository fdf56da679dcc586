"""The CLI end to end on the default model (the README's main command)."""

from __future__ import annotations

import subprocess

import pytest

from tests.refenv import REPO


@pytest.mark.slow
def test_demo_answers_the_chat_prompt(smollm2_dir):
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "fastlora-jax"), "demo",
                           "--model", str(smollm2_dir)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "assistant: The capital of France is Paris." in proc.stdout


def test_cli_reports_bad_model_path_cleanly(tmp_path):
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "fastlora-jax"), "chat",
                           "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
