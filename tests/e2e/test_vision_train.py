"""Training tiny vision-language models (LLaVA, LLaVA-NeXT, Gemma 3, Qwen2.5-VL) on a synthetic image task
(coloured shapes -> the colours' names, 0 to 2 images a row) with the existing SFTTrainer and the
`fastlora-jax train` command: the training and held-out losses fall, the adapters train, the
adapter folder is written."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from fastlora_jax import FastVisionModel, SFTTrainer, TrainingArguments
from fastlora_jax.cli import main
from fastlora_jax.testing.vision import mixed_shapes_dataset, shapes_dataset, tiny_vlm_numpy


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_vlm_numpy(tmp_path_factory.mktemp("tiny_llava") / "ckpt")


@pytest.mark.slow  # ~60-90 s each on 2 cores
@pytest.mark.parametrize("model_type", ["llava", "llava_next", "gemma3", "qwen2_5_vl"])
def test_loss_falls_on_coloured_shapes(model_type: str, tmp_path: pathlib.Path) -> None:
    # rows hold 0, 1 or 2 images (padded per row); Qwen2.5-VL keeps each image's resolution,
    # and its images come in two sizes (one non-square): different patch counts per row
    data = mixed_shapes_dataset(tmp_path / "shapes", n=12, sizes=((32, 24), (24, 40)))
    held_out = mixed_shapes_dataset(tmp_path / "held_out", n=5, seed=1, sizes=((24, 40),))
    folder = tiny_vlm_numpy(tmp_path / "ckpt", model_type)
    model, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12,
                             per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             learning_rate=1e-2, eval_strategy="steps", eval_steps=6,
                             per_device_eval_batch_size=2,  # 5 rows: the last batch is padded
                             warmup_steps=0, logging_steps=1,
                             # LLaVA-NeXT: about 45 tokens an image here (base tile, unpadded grid)
                             max_seq_length=160 if model_type == "llava_next" else 80,
                             disable_tqdm=True, save_steps=0)
    trainer = SFTTrainer(model=model, tokenizer=processor, train_dataset=str(data), args=args,
                         eval_dataset=str(held_out))
    assert trainer.data_stats.examples == 12 and trainer.data_stats.dropped_no_labels == 0
    assert trainer.eval_set.num_rows == 5
    before = trainer.evaluate()["eval_loss"]
    stats = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text()
               .splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    assert stats["final_loss"] == losses[-1]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and stats["eval_loss"] == evals[-1]
    assert evals[-1] < 0.75 * before, (before, evals)
    # both parts' adapters trained and are back on the model
    for part in (model.lora["language"], model.lora["vision"]["tower"]):
        attention = part["layers"].get("self_attn") or part["layers"]["attn"]  # Qwen's tower
        b = next(iter(attention.values()))["lora_B"]
        assert float(np.abs(b).max()) > 0


@pytest.mark.parametrize("model_type, vision_modules", [("llava", "vision_tower"),
                                                         ("qwen2_5_vl", "visual")])
def test_cli_trains_a_vision_model(model_type: str, vision_modules: str, llava_dir: pathlib.Path,
                                   tmp_path: pathlib.Path) -> None:
    size = (32, 24) if model_type == "qwen2_5_vl" else None
    data = shapes_dataset(tmp_path / "shapes", n=4, size=size)
    folder = llava_dir if model_type == "llava" else tiny_vlm_numpy(tmp_path / "ckpt", model_type)
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(data), "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--max_seq_length", "64",
                 "--output_dir", str(out), "--r", "4", "--disable_tqdm", "true"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert vision_modules in config["target_modules"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
