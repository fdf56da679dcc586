"""The Unsloth-shaped convenience API. It holds no logic the pure form lacks."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.converters.hf import Convert, checkpoint_dir, load_checkpoint
from fastlora_jax.converters.peft import CONFIG_NAME as ADAPTER_CONFIG
from fastlora_jax.converters.peft import read_adapter_config
from fastlora_jax.errors import CheckpointError, ConfigError
from fastlora_jax.lora.layer import init_lora
from fastlora_jax.lora.spec import LoraConfig, resolve
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.decoder import ParamSpec
from fastlora_jax.models.registry import family_for

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

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers and tokenizers raise many types for broken files
        reason = " ".join(str(err).split())[:300]  # one line, however transformers wraps it
        raise CheckpointError(f"the tokenizer files in {str(folder)!r} could not be loaded "
                              f"({type(err).__name__}: {reason}); re-download them or copy a "
                              f"working tokenizer into the folder") from None


def is_projection(spec: ParamSpec) -> bool:
    """Decoder linear weights (quantized by load_in_4bit/8bit); embeddings, norms, lm_head are not."""
    return (spec.stacked and spec.path[-1] == "weight" and spec.path[1] in ("self_attn", "mlp")
            and spec.path[-2].endswith("_proj"))


def quantizing_convert(kind: str, dtype: jnp.dtype) -> Convert:
    """Loader hook: quantize each decoder projection as it streams in (one whole layer at a time);
    cast everything else to `dtype` (row-wise, so large tensors may arrive in row chunks)."""
    from fastlora_jax.quant import quantize_int8, quantize_nf4

    quantize = quantize_nf4 if kind == "nf4" else quantize_int8

    def convert(spec: ParamSpec, array: np.ndarray) -> Any:
        if is_projection(spec):
            return quantize(array, dtype=dtype.name)
        return array.astype(dtype, copy=False)

    return convert


class FastLanguageModel:
    """`model, tokenizer = FastLanguageModel.from_pretrained(path)`, as in Unsloth."""

    @staticmethod
    def from_pretrained(model_name: str | pathlib.Path, max_seq_length: int = 2048,
                        dtype: Any = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False) -> tuple[CausalLM, Any]:
        """Load a local HF checkpoint folder, or a PEFT adapter folder (its base is loaded first).

        dtype: compute dtype — a jnp dtype or its name; None picks bfloat16 on GPU/TPU and float32
        on CPU. load_in_4bit / load_in_8bit quantize the decoder's linear weights to NF4 / int8
        while streaming (embeddings, norms and lm_head stay in `dtype`); a checkpoint that is
        already bitsandbytes-quantized loads as stored.
        """
        folder = pathlib.Path(model_name)
        if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
            adapter_cfg = read_adapter_config(folder)
            base = adapter_cfg.get("base_model_name_or_path")
            if not base:
                raise CheckpointError(f"{str(folder / ADAPTER_CONFIG)!r} names no "
                                      f"base_model_name_or_path; load the base model, then "
                                      f"model.load_adapter({str(folder)!r})")
            base_path = pathlib.Path(base)
            if not base_path.is_absolute() and (folder / base_path).exists():
                base_path = folder / base_path
            model, tokenizer = FastLanguageModel.from_pretrained(
                base_path, max_seq_length=max_seq_length, dtype=dtype,
                load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
            model.load_adapter(folder)
            return model, tokenizer
        folder = checkpoint_dir(folder)
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive int")
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are exclusive; pick one")
        compute = resolve_dtype(dtype)
        convert = None
        if load_in_4bit or load_in_8bit:
            convert = quantizing_convert("nf4" if load_in_4bit else "int8", compute)
        config, params = load_checkpoint(folder, dtype=compute, convert=convert)
        model = CausalLM(config, params, max_seq_length=max_seq_length, name_or_path=str(folder))
        return model, load_tokenizer(folder)

    @staticmethod
    def get_peft_model(model: CausalLM, r: int = 16, target_modules: Sequence[str] | str | None = None,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = True, random_state: int = 3407,
                       use_rslora: bool = False, use_dora: bool = False,
                       rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None,
                       init_lora_weights: bool | str = True) -> CausalLM:
        """Attach fresh LoRA adapters (Unsloth's arguments); returns the same model object.

        target_modules None means all seven projections (Unsloth's default). The adapters are
        float32 master weights in their own pytree (`model.lora_params()`).
        """
        if use_gradient_checkpointing not in (True, False, "offload", "unsloth", "dots"):
            raise ConfigError(f"use_gradient_checkpointing={use_gradient_checkpointing!r} must be "
                              f"True, False, 'offload' ('unsloth' is its alias) or 'dots'")
        config = LoraConfig.create(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            bias=bias, use_rslora=use_rslora, use_dora=use_dora, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, init_lora_weights=init_lora_weights,
            random_state=random_state)
        family = family_for(model.config.model_type)
        spec = resolve(config, model.config, family.default_target_modules)
        model.set_adapter(spec, init_lora(spec, model.config, model.params()))
        model.use_gradient_checkpointing = ("offload" if use_gradient_checkpointing == "unsloth"
                                            else use_gradient_checkpointing)
        return model
