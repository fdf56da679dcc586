"""GRPOTrainer / DPOTrainer end to end on a tiny model with the real SmolLM2 tokenizer: logs,
sampled completions, checkpoints, resume (bit for bit), and the `grpo` / `dpo` commands."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from datasets import Dataset

from fastlora_jax import DPOConfig, DPOTrainer, FastLanguageModel, GRPOConfig, GRPOTrainer
from fastlora_jax.cli import main
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint

VOCAB = dict(TINY_LLAMA, vocab_size=49152)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny") / "m", VOCAB, llama_tensors(VOCAB))
    for path in smollm2_dir.iterdir():  # the tokenizer files and chat template
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, folder / path.name)
    return folder


def _model(folder):
    model, tok = FastLanguageModel.from_pretrained(folder, dtype="float32")
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8), tok


def has_answer(completions, answer, **_):
    """Scores only half the completions (None elsewhere), as a reward function may."""
    return [float(a in c[0]["content"]) if i % 2 == 0 else None
            for i, (c, a) in enumerate(zip(completions, answer))]


def length_penalty(completions, **_):
    return [-len(c[0]["content"]) / 100 for c in completions]


def _grpo(folder, out, **kw):
    model, tok = _model(folder)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"say {i}"}]
                                         for i in range(6)], "answer": [str(i) for i in range(6)]})
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, num_generations=4, max_completion_length=6,
                      max_steps=4, num_iterations=2, beta=0.04, learning_rate=1e-2,
                      report_to="none", disable_tqdm=True, save_steps=2,
                      use_gradient_checkpointing=False, **kw)
    return model, GRPOTrainer(model, [has_answer, length_penalty], args=args, train_dataset=data,
                              processing_class=tok)


def test_grpo_trainer_logs_checkpoints_and_resumes_exactly(tiny, tmp_path):
    model, trainer = _grpo(tiny, tmp_path / "a")
    assert trainer.steps_per_round == 2 and trainer.needs_old_logps
    stats = trainer.train()
    final = jax.tree.map(np.asarray, model.lora_params())
    records = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "reward", "reward_std",
                "rewards/has_answer/mean", "rewards/length_penalty/std",
                "completions/mean_length", "grad_norm", "time/rollout"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0  # the policy moved off the reference
    # the second pass over a round sees ratios != 1 (old log-probs reused)
    assert any(r["clip_ratio/region_mean"] > 0 for r in records[1::2])
    samples = [json.loads(x) for x in (tmp_path / "a" / "completions.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "advantage", "rewards", "step"} <= set(samples[0])
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    assert stats["global_step"] == 4

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    model_b, trainer_b = _grpo(tiny, tmp_path / "b")
    trainer_b.train(resume_from_checkpoint=True)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(model_b.lora_params())):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_dpo_trainer_with_precomputed_reference(tiny, tmp_path):
    model, tok = _model(tiny)
    user = lambda i: [{"role": "user", "content": f"pick {i}"}]  # noqa: E731
    data = Dataset.from_dict({
        "prompt": [user(i) for i in range(4)],
        "chosen": [[{"role": "assistant", "content": "yes"}]] * 4,
        "rejected": [[{"role": "assistant", "content": "no thanks"}]] * 4})
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                     gradient_accumulation_steps=1, max_steps=3, learning_rate=5e-3,
                     precompute_ref_log_probs=True, report_to="none", disable_tqdm=True,
                     use_gradient_checkpointing=False)
    trainer = DPOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert abs(records[0]["loss"] - np.log(2)) < 1e-5     # B = 0: policy == reference
    assert records[-1]["rewards/margins"] > 0 and records[-1]["loss"] < records[0]["loss"]


def test_grpo_and_dpo_commands(tiny, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def short(completions, **kw):\n"
                       "    return [-len(c) / 10 for c in completions]\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {i}"}) + "\n" for i in range(4)))
    config = tmp_path / "run.yaml"
    config.write_text("num_generations: 2\nmax_completion_length: 4\n")
    base = ["--model", str(tiny), "--data", str(data), "--r", "4", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true"]
    assert main(["grpo", *base, "--output_dir", str(tmp_path / "g"), "--config", str(config),
                 "--reward_funcs", f"{rewards}:short", "--reward_weights", "2.0"]) == 0
    assert (tmp_path / "g" / "adapter" / "adapter_config.json").exists()
    assert main(["grpo", *base, "--output_dir", str(tmp_path / "x"),
                 "--reward_funcs", f"{rewards}:missing"]) == 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "bb"})
                             + "\n" for i in range(2)))
    assert main(["dpo", "--model", str(tiny), "--data", str(pairs), "--output_dir",
                 str(tmp_path / "d"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--loss_type", "sigmoid,hinge",
                 "--report_to", "none", "--disable_tqdm", "true"]) == 0
    assert (tmp_path / "d" / "adapter" / "adapter_model.safetensors").exists()


def test_grpo_trainer_takes_a_list_of_rows_like_a_dataset(tiny, tmp_path):
    """Prompts built in memory (no `datasets`) make the same round as the same rows in a Dataset;
    a malformed list is one clear error."""
    from fastlora_jax.errors import DataError

    model, tok = _model(tiny)
    rows = [{"prompt": [{"role": "user", "content": f"say {i}"}], "answer": str(i)}
            for i in range(4)]
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=4, report_to="none",
                      disable_tqdm=True, use_gradient_checkpointing=False)
    rounds = []
    for data in (rows, Dataset.from_list(rows)):
        trainer = GRPOTrainer(model, has_answer, args=args, train_dataset=data,
                              processing_class=tok)
        rounds.append(trainer.generate_round(1, model.params(), model.lora_params()))
    for key in ("input_ids", "completion_mask", "advantages"):
        np.testing.assert_array_equal(rounds[0][key], rounds[1][key])
    assert rounds[0]["samples"] == rounds[1]["samples"]
    for bad, says in (([], "empty list"), (rows[:1] + ["x"], "row 1 is a str"),
                      (rows[:1] + [{"prompt": "p"}], "row 1 has keys")):
        with pytest.raises(DataError, match=says):
            GRPOTrainer(model, has_answer, args=args, train_dataset=bad, processing_class=tok)
