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
def test_demo_as_the_readme_runs_it_learns_the_held_out_tags(smollm2_dir, tmp_path):
    """The README's main command, unshortened (41 steps; ~3 minutes on 2 idle cores): the tag
    accuracy on held-out sentences, whose nouns no training sentence contains, goes from the base
    model's ~0 to far above chance (1/3); it trains, evaluates and exports its files."""
    from fastlora_jax.demo import HELD_OUT_NOUNS, TRAIN_NOUNS

    out = tmp_path / "demo"
    proc = subprocess.run([CLI, "demo", "--model", str(smollm2_dir), "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert "held-out tag accuracy before training" in proc.stdout
    assert "held-out tag accuracy after training" in proc.stdout
    result = json.loads((out / "demo_result.json").read_text())
    assert result["accuracy_before"] <= 0.34 and result["accuracy_after"] >= 0.9, result
    seen = {noun for nouns in TRAIN_NOUNS.values() for noun in nouns}
    assert set(result["held_out_nouns"]) == {n for ns in HELD_OUT_NOUNS.values() for n in ns}
    assert not seen & set(result["held_out_nouns"])
    assert result["train"]["global_step"] == 41
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "loss.png").exists()


@pytest.mark.slow
def test_grpo_demo_runs_end_to_end_through_the_cli(smollm2_dir, tmp_path):
    """`fastlora-jax demo --task grpo`, cut to two steps: it evaluates before and after, trains,
    and writes its result and a PEFT adapter (the learning itself is measured in the README)."""
    out = tmp_path / "demo_grpo"
    proc = subprocess.run([CLI, "demo", "--task", "grpo", "--model", str(smollm2_dir),
                           "--output_dir", str(out), "--max_steps", "2"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert "held-out before GRPO" in proc.stdout and "held-out after GRPO" in proc.stdout
    result = json.loads((out / "demo_result.json").read_text())
    assert result["train"]["global_step"] == 2
    assert set(result["before"]) >= {"accuracy", "correct_reward", "mean_reward"}
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_cli_reports_bad_model_path_cleanly(tmp_path):
    proc = subprocess.run([CLI, "chat", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
