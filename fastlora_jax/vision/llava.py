"""LLaVA (`model_type: llava`): a CLIP or SigLIP tower, a two-layer MLP projector, and any text
decoder we support (Llama, Mistral, Qwen2, ...).

Each image is encoded by the tower; the hidden states after `vision_feature_layer` blocks
(transformers' `hidden_states[vision_feature_layer]`, default -2: the second-to-last block) lose
their first token (CLIP's CLS) under the `default` select strategy (`full` keeps it), and
`linear_2(act(linear_1(x)))` maps them to the text width. The results replace the image
placeholder tokens' embeddings, image after image, token after token.

Tensor names: `vision/names.py` (the projector's are multi_modal_projector.linear_{1,2}.*).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.errors import ConfigError
from fastlora_jax.models.decoder import ParamSpec, Params, Project
from fastlora_jax.models.registry import config_from_hf, config_to_hf as text_config_to_hf
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.names import tensor_part
from fastlora_jax.vision.vit import VisionConfig, encode, vision_param_specs

HARMLESS = frozenset({"image_seq_length", "ignore_index", "pad_token_id"})
_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "silu", "relu")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA checkpoint's config.json, strictly read."""

    model_type: str
    text: ModelConfig
    vision: VisionConfig
    image_token_id: int
    vision_feature_layer: int = -2
    select_strategy: str = "default"        # "default": drop the CLS token; "full": keep it
    projector_act: str = "gelu"
    projector_bias: bool = True
    extras: tuple[tuple[str, str], ...] = ()

    @property
    def feature_layers(self) -> int:
        """How many tower blocks run: hidden_states[k] is the output of block k - 1."""
        return self.vision_feature_layer % (self.vision.num_layers + 1)



def read_fields(r: _Reader, source: str) -> dict[str, Any]:
    """The LlavaConfig fields (less model_type and extras) that LLaVA and LLaVA-NeXT configs
    share, popped from `r`."""
    text_raw = r.take("text_config", dict)
    vision_raw = r.take("vision_config", dict)
    text = config_from_hf(text_raw, source=f"{source} (text_config)")
    vision = VisionConfig.from_hf(vision_raw, f"{source} (vision_config)")
    token = r.take("image_token_id", int, None)
    legacy = r.take("image_token_index", int, None)
    if token is None and legacy is None:
        raise ConfigError(f"{source}: required key 'image_token_id' is missing")
    layer = r.take("vision_feature_layer", int, -2)
    if not -(vision.num_layers + 1) <= layer <= vision.num_layers:
        raise ConfigError(f"{source}: vision_feature_layer={layer} is outside the tower's "
                          f"{vision.num_layers} layers")
    strategy = r.expect("vision_feature_select_strategy", ("default", "full"),
                        "the CLS token is dropped ('default') or kept ('full')")
    act = r.expect("projector_hidden_act", _ACTIVATIONS, "the projector's activation")
    bias = r.take("multimodal_projector_bias", bool, True)
    vocab = r.take("vocab_size", int, text.vocab_size)  # older checkpoints repeat it here
    if vocab != text.vocab_size:
        raise ConfigError(f"{source}: vocab_size={vocab} disagrees with text_config's "
                          f"{text.vocab_size}")
    tie = r.take("tie_word_embeddings", bool, text.tie_embeddings)
    if tie != text.tie_embeddings:
        raise ConfigError(f"{source}: tie_word_embeddings={tie} disagrees with text_config's "
                          f"{text.tie_embeddings}")
    return dict(text=text, vision=vision, image_token_id=token if token is not None else legacy,
                vision_feature_layer=layer, select_strategy=strategy, projector_act=act,
                projector_bias=bias)


def parse_config(hf: Mapping[str, Any], source: str) -> LlavaConfig:
    r = _Reader(dict(hf), source)
    fields = read_fields(r, source)
    r.finish("llava", HARMLESS)
    return LlavaConfig(model_type="llava", extras=r.extras(), **fields)


def fields_to_hf(c: LlavaConfig) -> dict[str, Any]:
    """The config.json keys of `read_fields` (and the extras) of a LLaVA-style config."""
    out: dict[str, Any] = {k: json.loads(v) for k, v in c.extras}
    out.update(text_config=text_config_to_hf(c.text), vision_config=c.vision.to_hf(),
               image_token_index=c.image_token_id, vision_feature_layer=c.vision_feature_layer,
               vision_feature_select_strategy=c.select_strategy,
               projector_hidden_act=c.projector_act, multimodal_projector_bias=c.projector_bias,
               tie_word_embeddings=c.text.tie_embeddings)
    return out


def config_to_hf(c: LlavaConfig) -> dict[str, Any]:
    out = fields_to_hf(c)
    out.update(model_type="llava", architectures=["LlavaForConditionalGeneration"])
    return dict(sorted(out.items()))


def vision_specs(c: LlavaConfig) -> list[ParamSpec]:
    specs = [dataclasses.replace(s, path=("tower",) + s.path) for s in vision_param_specs(c.vision)]
    dims = {"linear_1": (c.text.hidden_size, c.vision.hidden_size),
            "linear_2": (c.text.hidden_size, c.text.hidden_size)}
    for name, shape in dims.items():
        specs.append(ParamSpec(("projector", name, "weight"), shape, (None, None), False))
        if c.projector_bias:
            specs.append(ParamSpec(("projector", name, "bias"), shape[:1], (None,), False))
    return specs


def projector_act(kind: str) -> Any:
    return {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
            "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "silu": jax.nn.silu, "relu": jax.nn.relu}[kind]


def tile_features(c: LlavaConfig, params: Params, lora: Params | None, project: Project,
                  pixels: jax.Array, attention_impl: Any = None, remat: Any = None) -> jax.Array:
    """pixels [N, C, H, W] -> projected features [N, tokens, text hidden] (tokens: the tower's
    positions, less the first under the default strategy)."""
    h = encode(c.vision, params["tower"], pixels, num_layers=c.feature_layers,
               lora=None if lora is None else lora.get("tower"), project=project,
               attention_impl=attention_impl, remat=remat)                      # [N,S,Dv]
    if c.select_strategy == "default":  # transformers drops the first token, CLS or not
        h = h[:, 1:]
    p = params["projector"]

    def linear(x: jax.Array, name: str) -> jax.Array:
        y = jnp.einsum("nsi,oi->nso", x, p[name]["weight"].astype(x.dtype))
        return y + p[name]["bias"].astype(x.dtype) if "bias" in p[name] else y

    return linear(projector_act(c.projector_act)(linear(h, "linear_1")), "linear_2")


def image_features(c: LlavaConfig, params: Params, lora: Params | None, project: Project,
                   images: Mapping[str, jax.Array], attention_impl: Any = None,
                   remat: Any = None) -> jax.Array:
    """pixel_values [N, C, H, W] -> [N * image tokens, text hidden], image after image."""
    x = tile_features(c, params, lora, project, images["pixel_values"], attention_impl, remat)
    return x.reshape(-1, x.shape[-1])


LLAVA = VisionArch(
    model_type="llava",
    architecture="LlavaForConditionalGeneration",
    parse_config=parse_config,
    config_to_hf=config_to_hf,
    vision_specs=vision_specs,
    tensor_part=functools.partial(tensor_part, what='LLaVA'),
    image_features=image_features,
)

__all__ = ["LLAVA", "LlavaConfig"]
