"""`fastlora-jax train` end to end: a short run, SIGKILL + resume = uninterrupted, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from fastlora_jax.demo import make_examples, write_jsonl
from fastlora_jax.testing.refenv import REPO
from fastlora_jax.train.logs import read_log
from tests.checkpoints import tiny_chat_model

CLI = str(REPO / ".venv" / "bin" / "fastlora-jax")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("train")
    model = tiny_chat_model(root / "tiny", smollm2_dir)
    data = write_jsonl(make_examples(120, seed=5), root / "data.jsonl")
    return root, model, data


def args(model, data, out, *extra):
    return [CLI, "train", "--model", str(model), "--data", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_seq_length", "64", "--learning_rate", "0.002", "--r", "4",
            "--lora_dropout", "0.1", "--train_on_responses_only", "true",
            "--disable_tqdm", "true", "--use_gradient_checkpointing", "false", *extra]


def run(cmd, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc


def test_short_run_writes_adapter_logs_and_plot(setup, tmp_path):
    root, model, data = setup
    held_out = write_jsonl(make_examples(20, seed=6, held_out=True), tmp_path / "held_out.jsonl")
    config = tmp_path / "run.yaml"  # 2e-3: a string to YAML 1.1, a number to our schema
    config.write_text("max_steps: 4\nlogging_steps: 2\nwarmup_steps: 1\nlearning_rate: 2e-3\n"
                      "eval_strategy: steps\neval_steps: 2\nper_device_eval_batch_size: 4\n")
    proc = run(args(model, data, tmp_path / "out", "--config", str(config), "--eval_data",
                    str(held_out), "--target_modules", "q_proj"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "loss.png", "log.jsonl", "train_stats.json",
                 "run_info.json"):
        assert (out / name).exists(), name
    train, evals = read_log(out / "log.jsonl")
    assert sorted(train) == [2, 4] and sorted(evals) == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_second"] > 0 for r in train.values())
    assert all(np.isfinite(r["eval_perplexity"]) for r in evals.values())
    events = b"".join(p.read_bytes() for p in (out / "runs").iterdir())  # TensorBoard
    assert b"train/loss" in events and b"eval/loss" in events
    assert "done: 4 steps" in proc.stdout and "eval loss" in proc.stdout
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())[
        "target_modules"] == ["q_proj"]
    # --use_gradient_checkpointing is a training argument: the trainer's step reads it from there
    assert json.loads((out / "run_info.json").read_text())["args"][
        "use_gradient_checkpointing"] is False


def test_sigkill_then_resume_equals_uninterrupted(setup, tmp_path):
    root, model, data = setup
    steps = ["--max_steps", "30", "--save_steps", "5"]
    full = run(args(model, data, tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(args(model, data, out, *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before checkpoint 10"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "30").exists(), "the run was not interrupted"
    resumed = run(args(model, data, out, *steps, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    log_full, _ = read_log(tmp_path / "full" / "log.jsonl")
    log_res, _ = read_log(out / "log.jsonl")
    assert all(log_res[s]["loss"] == log_full[s]["loss"] for s in range(1, 31))
    # the log was appended to, not rewritten: the killed run's records come first, then the
    # resume marker, then the resumed steps
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 10
    assert [r["step"] for r in records[:10]] == list(range(1, 11))
    assert records[-1]["step"] == 30


def test_unknown_yaml_key(setup, tmp_path):
    root, model, data = setup
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 2\nlerning_rate: 0.1\n")
    proc = run(args(model, data, tmp_path / "o", "--config", str(config)))
    assert proc.returncode == 2 and "lerning_rate" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_with_last_checkpoint_intact(setup, tmp_path):
    root, model, data = setup
    proc = run(args(model, data, tmp_path / "o", "--max_steps", "6", "--save_steps", "1",
                    "--learning_rate", "1e30", "--max_grad_norm", "0"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr
    saved = sorted(int(p.name) for p in (tmp_path / "o" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert saved and max(saved) < 6


def test_unwritable_output_dir(setup, tmp_path):
    root, model, data = setup
    (tmp_path / "file").write_text("x")
    proc = run(args(model, data, tmp_path / "file" / "out", "--max_steps", "1"))
    assert proc.returncode == 2 and "not writable" in proc.stderr


def test_missing_data_file(setup, tmp_path):
    root, model, _ = setup
    proc = run(args(model, tmp_path / "nope.jsonl", tmp_path / "o", "--max_steps", "1"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """One finished 2-step run (default targets), shared by the tests that only need a trained
    output folder: each CLI run costs a process start and a compile."""
    root, model, data = setup
    out = tmp_path_factory.mktemp("trained") / "o"
    proc = run(args(model, data, out, "--max_steps", "2"))
    assert proc.returncode == 0, proc.stderr
    return out


def test_fresh_run_into_a_used_output_dir_is_refused(setup, trained):
    root, model, data = setup
    assert (trained / "checkpoints").is_dir()
    again = run(args(model, data, trained, "--max_steps", "1"))
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_export_command_writes_peft_and_merged(setup, trained, tmp_path):
    import jax.numpy as jnp

    from fastlora_jax import FastLanguageModel

    root, model, data = setup
    adapter = trained / "adapter"
    for method in ("peft", "merged"):
        proc = run([CLI, "export", "--model", str(model), "--adapter", str(adapter),
                    "--output_dir", str(tmp_path / method), "--method", method,
                    "--merged_dtype", "float32"])
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    merged, _ = FastLanguageModel.from_pretrained(tmp_path / "merged", dtype="float32")
    base, _ = FastLanguageModel.from_pretrained(model, dtype="float32")
    base.load_adapter(adapter)
    ids = jnp.arange(1, 20, dtype=jnp.int32)[None]
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(base(ids)), atol=1e-4)
    again = run([CLI, "export", "--model", str(model), "--adapter", str(adapter),
                 "--output_dir", str(tmp_path / "merged"), "--method", "merged"])
    assert again.returncode == 2 and "not empty" in again.stderr
