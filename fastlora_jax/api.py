"""The Unsloth-shaped convenience API. It holds no logic the pure form lacks."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fastlora_jax.converters.gguf_config import read_gguf_config
from fastlora_jax.converters.gguf_load import load_gguf_params
from fastlora_jax.converters.gguf_read import GGUFFile, find_gguf
from fastlora_jax.converters.gguf_tokenizer import gguf_tokenizer
from fastlora_jax.converters.hf import checkpoint_dir, load_checkpoint
from fastlora_jax.converters.hub import resolve_model_path
from fastlora_jax.converters.peft import CONFIG_NAME as ADAPTER_CONFIG
from fastlora_jax.converters.peft import read_adapter_config
from fastlora_jax.errors import CheckpointError, ConfigError
from fastlora_jax.generation.config import GenerationConfig
from fastlora_jax.lora.layer import init_lora
from fastlora_jax.lora.spec import LoraConfig, resolve
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.registry import family_for
from fastlora_jax.quant import QuantKind
from fastlora_jax.vision.checkpoint import load_vlm
from fastlora_jax.vision.lora import flags_regex, resolve_vision_lora
from fastlora_jax.vision.model import VisionLM, load_processor

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


def adapter_base(folder: pathlib.Path) -> pathlib.Path:
    """The base model an adapter folder names (`base_model_name_or_path`, relative paths from
    the adapter's folder when they exist there)."""
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{str(folder / ADAPTER_CONFIG)!r} names no "
                              f"base_model_name_or_path; load the base model, then "
                              f"model.load_adapter({str(folder)!r})")
    base_path = pathlib.Path(base)
    if not base_path.is_absolute() and (folder / base_path).exists():
        base_path = folder / base_path
    return base_path


class FastLanguageModel:
    """`model, tokenizer = FastLanguageModel.from_pretrained(path)`, as in Unsloth."""

    @staticmethod
    def from_pretrained(model_name: str | pathlib.Path, max_seq_length: int = 2048,
                        dtype: Any = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, *, gguf_file: str | None = None,
                        revision: str | None = None) -> tuple[CausalLM, Any]:
        """Load an HF checkpoint folder, a PEFT adapter folder (its base is loaded first), a GGUF
        file (or a folder holding one, or `gguf_file=` inside a folder or hub repository), or any
        of these by hub id "org/name" (huggingface_hub's cache; `HF_HUB_OFFLINE=1` reads only
        the cache; `revision` picks a branch, tag or commit).

        dtype: compute dtype — a jnp dtype or its name; None picks bfloat16 on GPU/TPU and float32
        on CPU. load_in_4bit / load_in_8bit quantize the decoder's linear weights to NF4 / int8
        while streaming (embeddings, norms and lm_head stay in `dtype`); a checkpoint that is
        already bitsandbytes-quantized loads as stored. GGUF weights are dequantized to float32
        first (then cast or quantized the same way); the tokenizer is built from the file.
        """
        folder = resolve_model_path(model_name, revision=revision, gguf_file=gguf_file)
        gguf = find_gguf(folder, gguf_file)
        if gguf is None and (folder / ADAPTER_CONFIG).is_file() and not (
                folder / "config.json").is_file():
            model, tokenizer = FastLanguageModel.from_pretrained(
                adapter_base(folder), max_seq_length=max_seq_length, dtype=dtype,
                load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
            model.load_adapter(folder)
            return model, tokenizer
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive int")
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are exclusive; pick one")
        compute = resolve_dtype(dtype)
        quantize = (QuantKind.NF4 if load_in_4bit else QuantKind.INT8 if load_in_8bit else None)
        if gguf is not None:
            source = GGUFFile(gguf)
            config = read_gguf_config(source)
            params = load_gguf_params(source, config, dtype=compute, quantize=quantize)
            model = CausalLM(config, params, max_seq_length=max_seq_length, name_or_path=str(gguf))
            return model, gguf_tokenizer(source)
        # a hub id stays the model's name (a saved adapter's base_model_name_or_path)
        name = str(model_name) if folder != pathlib.Path(model_name) else str(folder)
        folder = checkpoint_dir(folder)
        config, params = load_checkpoint(folder, dtype=compute, quantize=quantize)
        model = CausalLM(config, params, max_seq_length=max_seq_length, name_or_path=name)
        model.generation_config = GenerationConfig.from_folder(folder, config)
        return model, load_tokenizer(folder)

    @staticmethod
    def for_inference(model: CausalLM, merge_adapters: bool = False) -> CausalLM:
        """Ready `model` for generation (Unsloth's call); returns the same model.

        Generation runs the KV-cache engine with the adapters unmerged, so the model can keep
        training. This call makes, once, the weight tree every later `generate` reads (on the
        CPU a copy with one buffer per layer, which XLA's CPU dot reads fastest); with
        merge_adapters=True that tree has the adapters folded in (faster decoding; quantized
        weights are dequantized in it). `for_training` drops it.
        """
        from fastlora_jax.generation.generator import prepare

        model.generation_config = dataclasses.replace(model.generation_config,
                                                      merge_adapters=bool(merge_adapters))
        prepare(model, merge_adapters=bool(merge_adapters))
        return model

    @staticmethod
    def for_training(model: CausalLM) -> CausalLM:
        """Undo `for_inference`: drop the prepared weights; adapters apply unmerged again."""
        from fastlora_jax.generation.generator import release

        model.generation_config = dataclasses.replace(model.generation_config,
                                                      merge_adapters=False)
        release(model)
        return model

    @staticmethod
    def get_peft_model(model: CausalLM, r: int = 16, target_modules: Sequence[str] | str | None = None,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str | None = None,
                       random_state: int = 3407,
                       use_rslora: bool = False, use_dora: bool = False,
                       rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None,
                       init_lora_weights: bool | str = True) -> CausalLM:
        """Attach fresh LoRA adapters (Unsloth's arguments); returns the same model object.

        target_modules None means all seven projections (Unsloth's default). The adapters are
        float32 master weights in their own pytree (`model.lora_params()`).

        Unlike Unsloth, gradient checkpointing is not set here: the model holds no training
        state, so `use_gradient_checkpointing` belongs to `TrainingArguments`; passing it here
        is an error that says so rather than a setting that is silently lost.
        """
        if use_gradient_checkpointing is not None:
            raise ConfigError(f"get_peft_model(use_gradient_checkpointing="
                              f"{use_gradient_checkpointing!r}): gradient checkpointing is a "
                              f"training setting; pass TrainingArguments(use_gradient_"
                              f"checkpointing={use_gradient_checkpointing!r}) (CLI: "
                              f"--use_gradient_checkpointing) instead")
        config = LoraConfig.create(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            bias=bias, use_rslora=use_rslora, use_dora=use_dora, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, init_lora_weights=init_lora_weights,
            random_state=random_state)
        family = family_for(model.config.model_type)
        spec = resolve(config, model.config, family.default_target_modules)
        model.set_adapter(spec, init_lora(spec, model.config, model.params()))
        return model


class FastVisionModel:
    """`model, processor = FastVisionModel.from_pretrained(path)`, as in Unsloth."""

    @staticmethod
    def from_pretrained(model_name: str | pathlib.Path, max_seq_length: int = 2048,
                        dtype: Any = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False) -> tuple[VisionLM, Any]:
        """Load a vision-language HF checkpoint folder and its processor (AutoProcessor), or a
        PEFT adapter folder (its base, then the adapter).

        load_in_4bit / load_in_8bit quantize the text decoder's projections (NF4 / int8); the
        vision tower and projector stay in the compute `dtype` (None: bfloat16 on GPU/TPU,
        float32 on CPU)."""
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are exclusive; pick one")
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive int")
        folder = resolve_model_path(model_name)
        if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
            base = adapter_base(folder)
            model, processor = FastVisionModel.from_pretrained(
                base, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit)
            model.load_adapter(folder)
            return model, processor
        quantize = QuantKind.NF4 if load_in_4bit else QuantKind.INT8 if load_in_8bit else None
        arch, config, params = load_vlm(folder, dtype=resolve_dtype(dtype), quantize=quantize)
        processor = load_processor(folder, arch)
        model = VisionLM(arch, config, params, max_seq_length=max_seq_length,
                         name_or_path=str(model_name), processor=processor)
        return model, processor

    @staticmethod
    def get_peft_model(model: VisionLM, finetune_vision_layers: bool = True,
                       finetune_language_layers: bool = True,
                       finetune_attention_modules: bool = True,
                       finetune_mlp_modules: bool = True, r: int = 16,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       random_state: int = 3407, use_rslora: bool = False,
                       target_modules: Any = None, init_lora_weights: bool | str = True,
                       rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None,
                       use_gradient_checkpointing: Any = None) -> VisionLM:
        """Attach fresh adapters. target_modules None: the four switches pick the attention
        and / or MLP projections of the vision and / or language layers (Unsloth's regex);
        a list or regex is matched on the HF module names as PEFT does. Returns `model`."""
        if use_gradient_checkpointing is not None:
            raise ConfigError(f"get_peft_model(use_gradient_checkpointing="
                              f"{use_gradient_checkpointing!r}): gradient checkpointing is a "
                              f"training setting; pass TrainingArguments(use_gradient_"
                              f"checkpointing=...) instead")
        if target_modules is None or target_modules == "all-linear":
            target_modules = flags_regex(model.arch, model.config,
                                         vision=finetune_vision_layers,
                                         language=finetune_language_layers,
                                         attention=finetune_attention_modules,
                                         mlp=finetune_mlp_modules)
        lora_config = LoraConfig.create(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            bias=bias, use_rslora=use_rslora, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, init_lora_weights=init_lora_weights,
            random_state=random_state)
        spec = resolve_vision_lora(model.arch, model.config, lora_config)
        lora: Params = {}
        if spec.language is not None:
            lora["language"] = init_lora(spec.language, model.config.text,
                                         model.frozen["language"])
        if spec.vision is not None:
            lora["vision"] = {"tower": init_lora(spec.vision, model.config.vision,
                                                 model.frozen["vision"]["tower"])}
        model.set_adapter(spec, lora)
        return model

    @staticmethod
    def for_training(model: VisionLM) -> VisionLM:
        """Unsloth's call; adapters always apply unmerged here, so nothing changes."""
        return model

    @staticmethod
    def for_inference(model: VisionLM) -> VisionLM:
        """Unsloth's call; generation reads the same trees, so nothing changes."""
        return model
