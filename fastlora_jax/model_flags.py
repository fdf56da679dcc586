"""The model and LoRA flags that the training commands (`train`, `grpo`, `dpo`) share, and the
loader they feed: `FastLanguageModel.from_pretrained` + `get_peft_model` from a command line's
values. Its own module so that `cli` and `rl_cli` both use it without importing each other.
The flags are `ModelArguments`' fields; their values go through the run-settings schema, so
`--target_modules q_proj` is a list of one module, as on `train`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fastlora_jax.errors import ConfigError
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
    """from_pretrained + get_peft_model from `ModelArguments` (or a dict of its raw values).

    A vision-language checkpoint (config.json's model_type in `vision.ARCHITECTURES`) loads with
    `FastVisionModel` and returns its processor in place of the tokenizer; its adapters go on the
    vision and language layers' projections (Unsloth's default) unless target_modules says
    otherwise."""
    from fastlora_jax import FastLanguageModel

    if not isinstance(settings, ModelArguments):
        settings = ModelArguments(**convert_fields(ModelArguments, settings,
                                                   source="command line"))
    if is_vision_checkpoint(model_dir):
        from fastlora_jax.api import FastVisionModel

        if settings.use_dora:
            raise ConfigError("use_dora is not supported for vision-language models yet")
        model, processor = FastVisionModel.from_pretrained(
            model_dir, max_seq_length=max_seq_length, dtype=settings.dtype,
            load_in_4bit=settings.load_in_4bit, load_in_8bit=settings.load_in_8bit)
        model = FastVisionModel.get_peft_model(
            model, r=settings.r, lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout, target_modules=settings.target_modules,
            use_rslora=settings.use_rslora, random_state=settings.random_state)
        return model, processor
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=max_seq_length, dtype=settings.dtype,
        load_in_4bit=settings.load_in_4bit, load_in_8bit=settings.load_in_8bit)
    model = FastLanguageModel.get_peft_model(
        model, r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules, use_rslora=settings.use_rslora,
        use_dora=settings.use_dora, random_state=settings.random_state)
    return model, tokenizer


def is_vision_checkpoint(model_dir: str) -> bool:
    """Whether `model_dir` (a folder or hub id) holds a supported vision-language checkpoint."""
    import json
    import pathlib

    from fastlora_jax.converters.hub import resolve_model_path
    from fastlora_jax.vision.registry import ARCHITECTURES

    config = pathlib.Path(resolve_model_path(model_dir)) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") in ARCHITECTURES
    except (OSError, ValueError, AttributeError):
        return False  # the text loader reports what is wrong with the folder
