"""Evaluation during training: the loss against an independent float64 computation, its
schedule and outputs (log, TensorBoard, plot, stats), the best adapter, early stopping."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pytest

from fastlora_jax import ConfigError, FastLanguageModel, SFTTrainer, TrainingArguments
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.logs import read_log
from tests.checkpoints import tiny_chat_model

TRAIN = [{"text": f"{a} {b} is {a + b}."} for a in range(6) for b in range(4)]
HELD_OUT = [{"text": f"{a} plus {b} makes {a + b} in all."} for a in range(4) for b in range(2)] + [
    {"text": "short"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("eval") / "m", smollm2_dir)


def make(folder, out, *, eval_rows=HELD_OUT, **kw):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, dtype="float32", max_seq_length=24)
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    kw = dict(dict(per_device_train_batch_size=2, gradient_accumulation_steps=1,
                   learning_rate=5e-3, max_steps=6, disable_tqdm=True,
                   use_gradient_checkpointing=False), **kw)
    return SFTTrainer(model, tokenizer, datasets.Dataset.from_list(TRAIN),
                      eval_dataset=datasets.Dataset.from_list(eval_rows),
                      args=TrainingArguments(output_dir=str(out), **kw))


def float64_eval_loss(trainer):
    """Token-weighted mean next-token loss of the eval rows, from the model's logits, in numpy."""
    rows = trainer.eval_set.rows
    logits = np.asarray(trainer.model(rows["input_ids"]), np.float64)          # [N, T, V]
    targets = rows["targets"]
    valid = targets != IGNORE
    shifted = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * valid).sum() / valid.sum())


def test_eval_loss_is_the_token_weighted_mean_whatever_the_batch_size(folder, tmp_path):
    one = make(folder, tmp_path / "a", per_device_eval_batch_size=1)
    three = make(folder, tmp_path / "b", per_device_eval_batch_size=4)  # 9 rows: a padded last batch
    a, b = one.evaluate(), three.evaluate()
    expected = float64_eval_loss(one)
    assert a["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert b["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert a["eval_tokens"] == b["eval_tokens"] == (one.eval_set.rows["targets"] != IGNORE).sum()
    assert a["eval_perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)


def test_periodic_evaluation_reaches_log_tensorboard_plot_and_stats(folder, tmp_path):
    t = make(folder, tmp_path / "o", eval_strategy="steps", eval_steps=2, logging_steps=3)
    stats = t.train()
    _, evals = read_log(tmp_path / "o" / "log.jsonl")
    assert sorted(evals) == [2, 4, 6]
    assert evals[6]["eval_loss"] == pytest.approx(stats["eval_loss"])
    assert stats["eval_loss"] == pytest.approx(float64_eval_loss(t), rel=1e-5)  # the final adapter
    assert evals[6]["eval_loss"] < evals[2]["eval_loss"]  # it learned the held-out pattern too
    assert stats["eval_perplexity"] == pytest.approx(np.exp(stats["eval_loss"]))
    events = b"".join(p.read_bytes() for p in (tmp_path / "o" / "runs").iterdir())
    assert b"eval/loss" in events and b"eval/perplexity" in events
    assert (tmp_path / "o" / "loss.png").stat().st_size > 0


def test_best_adapter_is_loaded_at_the_end(folder, tmp_path):
    # text unlike the training rows, and a large constant learning rate: the eval loss falls,
    # then rises (measured: best at step 2 of 6)
    unlike = [{"text": "the quick brown fox jumps over the lazy dog"},
              {"text": "hello world, how are you"}]
    settings = dict(eval_rows=unlike, eval_strategy="steps", eval_steps=1, learning_rate=0.2,
                    lr_scheduler_type="constant", load_best_model_at_end=True,
                    metric_for_best_model="eval_perplexity", save_steps=3)
    t = make(folder, tmp_path / "o", **settings)
    stats = t.train()
    _, evals = read_log(tmp_path / "o" / "log.jsonl")
    best_step = min(evals, key=lambda s: evals[s]["eval_perplexity"])
    assert stats["best_step"] == best_step and stats["loaded_best"]
    best = t.evaluate()["eval_perplexity"]
    assert best == pytest.approx(evals[best_step]["eval_perplexity"], rel=1e-6)
    assert best_step < 3, "the run never got worse after the first checkpoint: nothing is shown"
    # resumed from step 3 (after the best), the run still ends on the best adapter
    shutil.rmtree(tmp_path / "o" / "checkpoints" / "6")
    resumed = make(folder, tmp_path / "o", **settings)
    again = resumed.train(resume_from_checkpoint=True)
    assert again["start_step"] == 3 and again["best_step"] == best_step
    assert resumed.evaluate()["eval_perplexity"] == pytest.approx(best, rel=1e-6)


def test_early_stopping_after_patience_evaluations_without_improvement(folder, tmp_path):
    t = make(folder, tmp_path / "o", eval_strategy="epoch", early_stopping_patience=2,
             early_stopping_threshold=100.0, max_steps=60)
    stats = t.train()
    # the first evaluation sets the best; the next two do not beat it by 100: stop after the third
    per_epoch = len(t.data.rows[0]["input_ids"]) // 2
    assert stats["stopped_early"] and stats["global_step"] == 3 * per_epoch < 60
    _, evals = read_log(tmp_path / "o" / "log.jsonl")
    assert sorted(evals) == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert '"event": "early_stop"' in (tmp_path / "o" / "log.jsonl").read_text()
    assert (tmp_path / "o" / "checkpoints" / str(3 * per_epoch)).is_dir()


def test_evaluation_settings_are_checked(folder, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=2)
    with pytest.raises(ConfigError, match="eval_strategy='steps' needs an eval_dataset"):
        SFTTrainer(model, tokenizer, datasets.Dataset.from_list(TRAIN),
                   args=TrainingArguments(eval_strategy="steps"))
    with pytest.raises(ConfigError, match="early_stopping_patience compares evaluations"):
        TrainingArguments(early_stopping_patience=3)
