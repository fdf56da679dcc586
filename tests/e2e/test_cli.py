"""The CLI end to end on the default model (the README's main command, shortened)."""

from __future__ import annotations

import json
import subprocess

import pytest

from fastlora_jax.testing.refenv import REPO

CLI = str(REPO / ".venv" / "bin" / "fastlora-jax")


@pytest.mark.slow
def test_chat_answers_the_prompt(smollm2_dir):
    proc = subprocess.run([CLI, "chat", "--model", str(smollm2_dir), "--prompt",
                           "What is the capital of France?"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "assistant: The capital of France is Paris." in proc.stdout


@pytest.mark.slow
def test_demo_short_run_trains_evaluates_and_exports(smollm2_dir, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([CLI, "demo", "--model", str(smollm2_dir), "--output_dir", str(out),
                           "--max_steps", "2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "held-out tag accuracy before training" in proc.stdout
    assert "held-out tag accuracy after training" in proc.stdout
    result = json.loads((out / "demo_result.json").read_text())
    assert result["train"]["global_step"] == 2 and 0.0 <= result["accuracy_after"] <= 1.0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "loss.png").exists()


def test_cli_reports_bad_model_path_cleanly(tmp_path):
    proc = subprocess.run([CLI, "chat", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
