"""The vision-language model: pure forward over (frozen, lora), the `VisionLM` object users hold,
and `FastVisionModel` (Unsloth's entry points).

One forward for every architecture: the record (`vision/arch.py`) turns the batch's images into
embeddings of the text model's width; they replace the token embeddings at the image placeholder
tokens, in order; the shared text decoder (`models/decoder.py`) runs on those embeddings, with
each image's tokens attending to each other both ways where the architecture says so (Gemma 3).

    logits = forward(arch, config, spec, frozen, lora, batch)   # batch: input_ids + processor outputs
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.lora.layer import init_lora, lora_project, with_constants
from fastlora_jax.lora.spec import LoraConfig
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params, frozen_project
from fastlora_jax.quant import QuantKind
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.checkpoint import load_vlm, save_vlm_adapter, save_vlm_merged
from fastlora_jax.vision.lora import VisionLoraSpec, flags_regex, resolve_vision_lora


# ---------------------------------------------------------------------------------------------
# The pure form

def scatter_images(embeds: jax.Array, input_ids: jax.Array, image_token_id: int,
                   features: jax.Array) -> jax.Array:
    """embeds [B, T, H] with the k-th image token (row-major) replaced by features[k] [N, H].

    The caller checks on the host that the batch has exactly N image tokens (the collator and
    `VisionLM` do); here extra tokens would repeat the last feature row."""
    mask = input_ids == image_token_id                                          # [B,T]
    index = jnp.cumsum(mask.reshape(-1)) - 1
    index = jnp.clip(index, 0, max(features.shape[0] - 1, 0)).reshape(mask.shape)
    return jnp.where(mask[..., None], features[index].astype(embeds.dtype), embeds)


def image_block_ids(input_ids: jax.Array, image_token_id: int) -> jax.Array:
    """[B, T] int32: 1, 2, ... for each run of consecutive image tokens (one image), 0 else."""
    mask = input_ids == image_token_id
    start = mask & ~jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(mask, jnp.cumsum(start, axis=1), 0).astype(jnp.int32)


def _parts(spec: VisionLoraSpec | None, lora: Params | None, dropout_key: jax.Array | None,
           linear_impl: Any) -> tuple[Any, Any, Any, Any]:
    """(language LoRA tree, language projection, vision LoRA tree, vision projection)."""
    train = dropout_key is not None
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    lang_lora, lang_proj, vis_lora, vis_proj = None, frozen_project, None, frozen_project
    if spec is not None and lora is not None and spec.language is not None:
        lang_lora = with_constants(lora["language"], spec.language, keys[0])
        lang_proj = lora_project(spec.language, train=train, linear_impl=linear_impl)
    if spec is not None and lora is not None and spec.vision is not None:
        vis_lora = {"tower": with_constants(lora["vision"]["tower"], spec.vision, keys[1])}
        vis_proj = lora_project(spec.vision, train=train, linear_impl=linear_impl)
    return lang_lora, lang_proj, vis_lora, vis_proj


def input_embeddings(arch: VisionArch, config: Any, spec: VisionLoraSpec | None,
                     frozen: Params, lora: Params | None, batch: Mapping[str, jax.Array], *,
                     dropout_key: jax.Array | None = None, attention_impl: Any = None,
                     linear_impl: Any = None, remat: Any = None
                     ) -> tuple[jax.Array, jax.Array | None]:
    """(inputs_embeds [B, T, H] with the images in place, bidirectional ids [B, T] or None)."""
    ids = batch["input_ids"]
    _, _, vis_lora, vis_proj = _parts(spec, lora, dropout_key, linear_impl)
    language = frozen["language"]
    dtype = language["embed_tokens"]["weight"].dtype
    image = ids == config.image_token_id
    # the placeholder may lie outside the vocabulary (Gemma 3): its row is replaced anyway
    embeds = decoder.embed(config.text, language, jnp.where(image, 0, ids), dtype)
    blocks = image_block_ids(ids, config.image_token_id) if arch.image_blocks else None
    if "pixel_values" not in batch:
        return embeds, blocks
    features = arch.image_features(config, frozen["vision"], vis_lora, vis_proj, batch,
                                   attention_impl, remat)                           # [N,H]
    return scatter_images(embeds, ids, config.image_token_id, features), blocks


def hidden_states(arch: VisionArch, config: Any, spec: VisionLoraSpec | None, frozen: Params,
                  lora: Params | None, batch: Mapping[str, jax.Array], *,
                  dropout_key: jax.Array | None = None, attention_impl: Any = None,
                  linear_impl: Any = None, remat: Any = None) -> jax.Array:
    """Final-normed hidden states [B, T, H] of the text decoder for one batch (input_ids
    [B, T] int32, the processor's image arrays, optional positions / segment_ids [B, T])."""
    lang_lora, lang_proj, _, _ = _parts(spec, lora, dropout_key, linear_impl)
    embeds, blocks = input_embeddings(arch, config, spec, frozen, lora, batch,
                                      dropout_key=dropout_key, attention_impl=attention_impl,
                                      linear_impl=linear_impl, remat=remat)
    return decoder.hidden_states(
        config.text, frozen["language"], batch["input_ids"], positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"), lora=lang_lora, project=lang_proj,
        attention_impl=attention_impl, remat=remat, inputs_embeds=embeds,
        bidirectional_ids=blocks)


def forward(arch: VisionArch, config: Any, spec: VisionLoraSpec | None, frozen: Params,
            lora: Params | None, batch: Mapping[str, jax.Array], *,
            attention_impl: Any = None) -> jax.Array:
    """Logits [B, T, V]."""
    h = hidden_states(arch, config, spec, frozen, lora, batch, attention_impl=attention_impl)
    return decoder.logits_from_hidden(config.text, frozen["language"], h)


forward_jit = jax.jit(forward, static_argnums=(0, 1, 2), static_argnames=("attention_impl",))


# ---------------------------------------------------------------------------------------------
# The object users hold

class VisionLM:
    """A vision-language model: `model(input_ids=..., pixel_values=...)` -> logits [B, T, V].

    Holds the architecture record, its config, the frozen tree {"language", "vision"} and the
    adapters ({"language", "vision"} LoRA trees with their `VisionLoraSpec`), and the checkpoint's
    processor (for the chat template, the images and the exports).
    """

    def __init__(self, arch: VisionArch, config: Any, params: Params, *,
                 max_seq_length: int = 2048, name_or_path: str = "",
                 processor: Any = None) -> None:
        self.arch = arch
        self.config = config
        self.frozen = params
        self.max_seq_length = max_seq_length
        self.name_or_path = name_or_path
        self.processor = processor
        self.lora_spec: VisionLoraSpec | None = None
        self.lora: Params | None = None

    @property
    def text_config(self) -> Any:
        return self.config.text

    def params(self) -> Params:
        return self.frozen

    def lora_params(self) -> Params | None:
        return self.lora

    def set_adapter(self, spec: VisionLoraSpec, lora: Params) -> None:
        self.lora_spec, self.lora = spec, lora

    def batch(self, inputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The arrays the forward reads, from a processor output (numpy arrays or lists),
        checked: as many image tokens as the images give features."""
        if "input_ids" not in inputs:
            raise DataError("inputs lack 'input_ids'; pass the processor's output "
                            "(processor(text=..., images=..., return_tensors='np'))")
        out = {"input_ids": jnp.asarray(np.asarray(inputs["input_ids"]), jnp.int32)}
        mask = inputs.get("attention_mask")
        if mask is not None and not np.asarray(mask).all():
            # padding attends only to padding, real tokens only to real ones (transformers'
            # attention_mask); positions stay 0..T-1 as in transformers' forward
            out["segment_ids"] = jnp.asarray(np.asarray(mask), jnp.int32)
        for key in self.arch.input_keys:
            if key in inputs and inputs[key] is not None:
                out[key] = jnp.asarray(np.asarray(inputs[key]))
        if self.arch.host_inputs is not None:
            extra = self.arch.host_inputs(self.config, {k: np.asarray(v) for k, v in
                                                        inputs.items() if v is not None})
            out.update({k: jnp.asarray(v) for k, v in extra.items()})
        check_image_tokens(self, out)
        return out

    def __call__(self, input_ids: Any = None, *, attention_impl: Any = None,
                 **inputs: Any) -> jax.Array:
        """Logits [B, T, V] for input_ids [B, T] and the processor's image arrays."""
        batch = self.batch(dict(inputs, input_ids=input_ids))
        return forward_jit(self.arch, self.config, self.lora_spec, self.frozen, self.lora,
                           batch, attention_impl=attention_impl)

    def generate(self, inputs: Mapping[str, Any], max_new_tokens: int = 32, **options: Any
                 ) -> Any:
        """Greedy or sampled continuation of one processor output (`vision/generate.py`)."""
        from fastlora_jax.vision.generate import generate

        return generate(self, inputs, max_new_tokens=max_new_tokens, **options)

    def save_pretrained(self, folder: str | pathlib.Path, processor: Any = None, *,
                        overwrite: bool = False) -> pathlib.Path:
        """The PEFT adapter (both parts' modules under the transformers class's names)."""
        return save_vlm_adapter(folder, self.arch, self.lora_spec, self.lora,
                                base_model_name_or_path=self.name_or_path or None,
                                processor=processor, overwrite=overwrite)

    def save_pretrained_merged(self, folder: str | pathlib.Path, processor: Any = None, *,
                               save_method: str = "merged_16bit", dtype: Any = None,
                               max_shard_size: int | str = "5GB",
                               overwrite: bool = False) -> pathlib.Path:
        """`merged_16bit`: the whole model with adapters folded in; `lora`: the adapter only."""
        if save_method == "lora":
            return self.save_pretrained(folder, processor, overwrite=overwrite)
        if save_method != "merged_16bit":
            raise ConfigError(f"save_method={save_method!r} must be 'merged_16bit' or 'lora'")
        return save_vlm_merged(folder, self.arch, self.config, self.frozen, self.lora,
                               self.lora_spec, dtype=dtype, processor=processor,
                               max_shard_size=max_shard_size, overwrite=overwrite)


def check_image_tokens(model: VisionLM, batch: Mapping[str, Any]) -> None:
    """One DataError when the placeholders and the images' features disagree in number."""
    tokens = int(np.sum(np.asarray(batch["input_ids"]) == model.config.image_token_id))
    if "pixel_values" not in batch:
        if tokens:
            raise DataError(f"input_ids hold {tokens} image placeholder token(s) but no "
                            f"pixel_values were given; pass the images to the processor")
        return
    shapes = jax.eval_shape(
        lambda b: model.arch.image_features(model.config, model.frozen["vision"], None,
                                            frozen_project, b, None, None),
        {k: v for k, v in batch.items() if k != "input_ids"})
    if shapes.shape[0] != tokens:
        raise DataError(f"input_ids hold {tokens} image placeholder token(s) but the images "
                        f"give {shapes.shape[0]} feature rows; each image needs its "
                        f"placeholders (build inputs with the checkpoint's processor)")


# ---------------------------------------------------------------------------------------------
# Unsloth's entry points

class FastVisionModel:
    """`model, processor = FastVisionModel.from_pretrained(path)`, as in Unsloth."""

    @staticmethod
    def from_pretrained(model_name: str | pathlib.Path, max_seq_length: int = 2048,
                        dtype: Any = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False) -> tuple[VisionLM, Any]:
        """Load a vision-language HF checkpoint folder and its processor (AutoProcessor).

        load_in_4bit / load_in_8bit quantize the text decoder's projections (NF4 / int8); the
        vision tower and projector stay in the compute `dtype` (None: bfloat16 on GPU/TPU,
        float32 on CPU)."""
        from fastlora_jax.api import resolve_dtype
        from fastlora_jax.converters.hub import resolve_model_path

        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are exclusive; pick one")
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive int")
        folder = resolve_model_path(model_name)
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


def load_processor(folder: pathlib.Path, arch: VisionArch | None = None) -> Any:
    """The checkpoint's AutoProcessor (chat template, tokenizer and image processor), or what
    the architecture's `load_processor` builds."""
    from fastlora_jax.errors import CheckpointError

    try:
        from transformers import AutoProcessor

        if arch is not None and arch.load_processor is not None:
            return arch.load_processor(folder)
        return AutoProcessor.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many types for missing / broken files
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(f"the processor files in {str(folder)!r} could not be loaded "
                              f"({type(err).__name__}: {reason}); a vision-language checkpoint "
                              f"needs its processor (preprocessor_config.json and tokenizer "
                              f"files)") from None


__all__ = ["FastVisionModel", "VisionLM", "forward", "hidden_states", "input_embeddings"]
