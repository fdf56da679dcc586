"""What makes a vision-language architecture: one `VisionArch` record per HF `model_type`.

A vision-language checkpoint is a text decoder we already have (any `models/` family, read by
its own strict parser) plus a vision part: a tower and a projector that turn pixels into
embeddings of the text model's width, scattered into the token embeddings at the image
placeholder tokens. Everything that differs between architectures is a function of the record;
`vision/model.py` composes them and never asks which architecture it holds.

The architecture's config object (its `parse_config` result) is a frozen dataclass with at
least `model_type: str`, `text: ModelConfig` (the text decoder), `vision` (the tower's config,
which has `num_layers`) and `image_token_id: int`; it is hashable, so it can be a jit static
argument.

Parameter trees: frozen = {"language": the text decoder's tree (models/decoder.py),
"vision": the tree of `vision_specs` (tower and projector)}; LoRA = {"language": ...,
"vision": ...}, each in lora/layer.py's layout over that part's stacked layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from fastlora_jax.models.decoder import ParamSpec, Params, Project
from fastlora_jax.vision import names, vit

# Image features [total image tokens, text hidden] of a batch's images:
# (config, vision params, vision LoRA tree or None, projection, images, attention impl, remat)
ImageFeatures = Callable[[Any, Params, Params | None, Project, Mapping[str, jax.Array], Any,
                          Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class VisionArch:
    """A supported vision-language `model_type`. The fields with defaults describe the llava-style
    layout (transformers 5's module names, a CLIP / SigLIP tower of vision/vit.py, the tensor
    names of vision/names.py); an architecture sets only those that differ.

    architecture: the HF class name written to `architectures` (and loaded by the parity tests).
    parse_config: (config.json dict, source for messages) -> the architecture's config (strict:
      an unknown key is a ConfigError naming it).
    config_to_hf: the inverse, the config.json dict of a merged export.
    vision_specs: the vision tree's parameters (paths start with "tower" or "projector";
      LLaVA-NeXT adds ("image_newline",)).
    tensor_part: a stored tensor name -> ("language", the text model's HF name) or ("vision",
      ".".join(path) of the vision tree with a stacked layer's index after "layers") or None
      for a tensor the architecture knowingly ignores; an unknown name raises CheckpointError.
    image_features: pixels to embeddings (see `ImageFeatures`), in image order.
    tensor_name: (vision path, layer or None) -> the HF name a merged export writes.
    language_prefix: the text model's HF module prefix, as PEFT names the modules
      (`{language_prefix}.layers.{i}.self_attn.q_proj`); lm_head keeps its own name.
    vision_layers: the HF module prefix of the tower's layers (`{vision_layers}.{i}.{group}.{name}`).
    vision_projections: the tower's LoRA-targetable projections, (group, name) per layer.
    input_keys: the processor outputs, beside input_ids, that the forward reads.
    image_blocks: each image's tokens attend to each other both ways (Gemma 3).
    host_inputs: (config, the processor's output as numpy arrays) -> more arrays for the
      forward that the image sizes fix and a jitted forward cannot derive (Qwen2.5-VL: the
      vision tower's window layout and the M-RoPE `positions` [3, B, T]); None: nothing.
    load_processor: checkpoint folder -> its processor, where transformers' AutoProcessor
      needs help (None: AutoProcessor.from_pretrained).
    positions: (config, input_ids [B, T], the batch) -> the text decoder's positions, for an
      architecture whose positions depend on the images (None: the batch's, or 0..T-1).
    example_arrays: (config, one training example's image arrays) -> the arrays its training
      row holds, where examples would otherwise differ beyond their first axis (LLaVA-NeXT
      pads the tile axis to the most tiles); None: as the processor gave them.
    """

    model_type: str
    architecture: str
    parse_config: Callable[[Mapping[str, Any], str], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    vision_specs: Callable[[Any], list[ParamSpec]]
    tensor_part: Callable[[str], tuple[str, str] | None]
    image_features: ImageFeatures
    tensor_name: Callable[[tuple[str, ...], int | None], str] = names.tensor_name
    language_prefix: str = "model.language_model"
    vision_layers: str = "model.vision_tower.encoder.layers"
    vision_projections: tuple[tuple[str, str], ...] = vit.VISION_PROJECTIONS
    input_keys: tuple[str, ...] = ("pixel_values",)
    image_blocks: bool = False
    host_inputs: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None
    load_processor: Callable[[Any], Any] | None = None
    positions: Callable[[Any, jax.Array, Mapping[str, jax.Array]], jax.Array] | None = None
    example_arrays: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
