"""The model and LoRA flags that the training commands (`train`, `grpo`, `dpo`) share, and the
loader they feed: `FastLanguageModel.from_pretrained` + `get_peft_model` from a command line's
values. Its own module so that `cli` and `rl_cli` both use it without importing each other."""

from __future__ import annotations

import argparse
from typing import Any

# LoRA / model flags of `train` (FastLanguageModel.from_pretrained + get_peft_model arguments).
MODEL_FLAGS = {"r": 16, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": None,
               "use_rslora": False, "use_dora": False, "load_in_4bit": False,
               "load_in_8bit": False, "dtype": None, "random_state": 3407}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, found {text!r}")


def load_peft_model(model_dir: str, model_kw: dict[str, Any],
                    max_seq_length: int = 2048) -> tuple[Any, Any]:
    """from_pretrained + get_peft_model from the MODEL_FLAGS values of a command line."""
    from fastlora_jax import FastLanguageModel

    kw = dict(model_kw)
    targets = kw.pop("target_modules")
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",")]
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=max_seq_length, dtype=kw.pop("dtype"),
        load_in_4bit=kw.pop("load_in_4bit"), load_in_8bit=kw.pop("load_in_8bit"))
    model = FastLanguageModel.get_peft_model(model, target_modules=targets, **kw)
    return model, tokenizer
