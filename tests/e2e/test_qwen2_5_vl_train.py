"""Training a tiny Qwen2.5-VL on a synthetic image task (coloured shapes -> the colour's name)
with the existing SFTTrainer: the loss falls and both parts' adapters train."""

from __future__ import annotations

import json

import numpy as np

from fastlora_jax import FastVisionModel, SFTTrainer, TrainingArguments
from fastlora_jax.testing.qwen_vision import tiny_qwen2_5_vl_numpy
from fastlora_jax.testing.vision import shapes_dataset


def test_loss_falls_on_coloured_shapes(tmp_path) -> None:
    data = shapes_dataset(tmp_path / "shapes", n=12, size=(32, 24))  # non-square, one size
    folder = tiny_qwen2_5_vl_numpy(tmp_path / "ckpt")
    model, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=16,
                             per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             learning_rate=1e-2,
                             warmup_steps=0, logging_steps=1, max_seq_length=64,
                             disable_tqdm=True, save_steps=0)
    trainer = SFTTrainer(model=model, tokenizer=processor, train_dataset=str(data), args=args)
    assert trainer.data_stats.examples == 12 and trainer.data_stats.dropped_no_labels == 0
    stats = trainer.train()
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "out" / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert stats["final_loss"] == losses[-1]
    assert float(np.abs(model.lora["language"]["layers"]["self_attn"]["q_proj"]["lora_B"]).max()) > 0
    assert float(np.abs(model.lora["vision"]["tower"]["layers"]["attn"]["qkv"]["lora_B"]).max()) > 0
