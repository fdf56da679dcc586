"""The model and LoRA flags that the training commands (`train`, `grpo`, `dpo`) share, and the
loader they feed: `FastLanguageModel.from_pretrained` + `get_peft_model` from a command line's
values. Its own module so that `cli` and `rl_cli` both use it without importing each other.
The flags are `ModelArguments`' fields; their values go through the run-settings schema, so
`--target_modules q_proj` is a list of one module, as on `train`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fastlora_jax.train.args import ModelArguments
from fastlora_jax.train.schema import convert_fields

# LoRA / model flags (FastLanguageModel.from_pretrained + get_peft_model arguments) -> defaults.
MODEL_FLAGS = {f.name: f.default for f in dataclasses.fields(ModelArguments)}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, found {text!r}")


def load_peft_model(model_dir: str, settings: ModelArguments | dict[str, Any],
                    max_seq_length: int = 2048) -> tuple[Any, Any]:
    """from_pretrained + get_peft_model from `ModelArguments` (or a dict of its raw values)."""
    from fastlora_jax import FastLanguageModel

    if not isinstance(settings, ModelArguments):
        settings = ModelArguments(**convert_fields(ModelArguments, settings,
                                                   source="command line"))
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=max_seq_length, dtype=settings.dtype,
        load_in_4bit=settings.load_in_4bit, load_in_8bit=settings.load_in_8bit)
    model = FastLanguageModel.get_peft_model(
        model, r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules, use_rslora=settings.use_rslora,
        use_dora=settings.use_dora, random_state=settings.random_state)
    return model, tokenizer
