"""The Unsloth-shaped convenience API. It holds no logic the pure form lacks."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from fastlora_jax.converters.hf import checkpoint_dir, load_checkpoint
from fastlora_jax.errors import ConfigError
from fastlora_jax.models.causal_lm import CausalLM

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """A jnp dtype from a dtype, its name, or None (bfloat16 on accelerators, float32 on CPU)."""
    if dtype is None:
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype={dtype!r} is not a dtype; use 'bfloat16', 'float16' or "
                          f"'float32'") from None
    if resolved not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ConfigError(f"dtype={dtype!r} is not a floating compute dtype; use 'bfloat16', "
                          f"'float16' or 'float32'")
    return resolved


def load_tokenizer(folder: pathlib.Path) -> Any:
    """The transformers tokenizer of `folder`, or None (logged) when it has no tokenizer files."""
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        log.warning("no tokenizer files (%s) in %s: returning tokenizer=None",
                    ", ".join(TOKENIZER_FILES), folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class FastLanguageModel:
    """`model, tokenizer = FastLanguageModel.from_pretrained(path)`, as in Unsloth."""

    @staticmethod
    def from_pretrained(model_name: str | pathlib.Path, max_seq_length: int = 2048,
                        dtype: Any = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False) -> tuple[CausalLM, Any]:
        """Load a local HF checkpoint folder. Returns (model, tokenizer or None).

        dtype: compute/storage dtype of the frozen weights — a jnp dtype or its name; None picks
        bfloat16 on GPU/TPU and float32 on CPU.
        """
        folder = checkpoint_dir(model_name)
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive int")
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are exclusive; pick one")
        if load_in_4bit or load_in_8bit:
            raise ConfigError("quantized loading (load_in_4bit / load_in_8bit) is not available in "
                              "this version; load with load_in_4bit=False")
        compute = resolve_dtype(dtype)
        config, params = load_checkpoint(folder, dtype=compute)
        model = CausalLM(config, params, max_seq_length=max_seq_length, name_or_path=str(folder))
        return model, load_tokenizer(folder)
