"""Gemma 3 with images (`model_type: gemma3`): a SigLIP tower, an average-pool + RMSNorm + matrix
projector, and the Gemma 3 text decoder; each image's tokens attend to each other both ways.

Each image's last hidden state (SigLIP's post-norm applied), a g x g grid of patches, is
average-pooled to `mm_tokens_per_image` tokens (a sqrt(tokens) x sqrt(tokens) grid, window and
stride g / sqrt(tokens)), normed with Gemma's RMSNorm (1 + w, eps of the tower) and multiplied by
`mm_input_projection_weight` [vision hidden, text hidden]. The text embeddings are scaled by
sqrt(hidden) as in every Gemma; the image features replace the placeholders unscaled. In the
text decoder a run of consecutive image tokens is one block: within it attention is
bidirectional (still under a sliding layer's window), as transformers' Gemma 3 masks do.

Tensor names: `vision/names.py` (lm_head is absent when tied; the projector's are
multi_modal_projector.mm_input_projection_weight and .mm_soft_emb_norm.weight).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.errors import ConfigError
from fastlora_jax.models.decoder import ParamSpec, Params, Project, rms_norm
from fastlora_jax.models.registry import config_from_hf, config_to_hf as text_config_to_hf
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.names import tensor_part
from fastlora_jax.vision.vit import TowerKind, VisionConfig, encode, vision_param_specs


@dataclasses.dataclass(frozen=True)
class Gemma3VisionConfig:
    """A Gemma 3 vision-language checkpoint's config.json, strictly read."""

    model_type: str
    text: ModelConfig
    vision: VisionConfig
    image_token_id: int
    mm_tokens_per_image: int
    boi_token_id: int
    eoi_token_id: int
    extras: tuple[tuple[str, str], ...] = ()

    @property
    def pool(self) -> int:
        """The average pool's window (and stride) in patches."""
        return self.vision.grid // math.isqrt(self.mm_tokens_per_image)


def parse_config(hf: Mapping[str, Any], source: str) -> Gemma3VisionConfig:
    r = _Reader(dict(hf), source)
    text = config_from_hf(dict(r.take("text_config", dict), model_type="gemma3_text"),
                          source=f"{source} (text_config)")
    vision = VisionConfig.from_hf(r.take("vision_config", dict), f"{source} (vision_config)")
    if vision.kind is not TowerKind.SIGLIP:
        raise ConfigError(f"{source}: Gemma 3's vision tower must be siglip_vision_model, found "
                          f"{vision.kind.value}")
    tokens = r.take("mm_tokens_per_image", int, 256)
    side = math.isqrt(tokens)
    if side * side != tokens or vision.grid % side:
        raise ConfigError(f"{source}: mm_tokens_per_image={tokens} must be a square whose side "
                          f"divides the tower's {vision.grid} patches per side")
    tie = r.take("tie_word_embeddings", bool, text.tie_embeddings)
    if tie != text.tie_embeddings:
        raise ConfigError(f"{source}: tie_word_embeddings={tie} disagrees with text_config's "
                          f"{text.tie_embeddings}")
    config = Gemma3VisionConfig(
        model_type="gemma3", text=text, vision=vision,
        image_token_id=r.take("image_token_index", int, 262_144),
        mm_tokens_per_image=tokens, boi_token_id=r.take("boi_token_index", int, 255_999),
        eoi_token_id=r.take("eoi_token_index", int, 256_000), extras=())
    r.finish("gemma3", frozenset({"pad_token_id"}))
    return dataclasses.replace(config, extras=r.extras())


def config_to_hf(c: Gemma3VisionConfig) -> dict[str, Any]:
    out: dict[str, Any] = {k: json.loads(v) for k, v in c.extras}
    out.update(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
               text_config=text_config_to_hf(c.text), vision_config=c.vision.to_hf(),
               image_token_index=c.image_token_id, mm_tokens_per_image=c.mm_tokens_per_image,
               boi_token_index=c.boi_token_id, eoi_token_index=c.eoi_token_id,
               tie_word_embeddings=c.text.tie_embeddings)
    return dict(sorted(out.items()))


def vision_specs(c: Gemma3VisionConfig) -> list[ParamSpec]:
    specs = [dataclasses.replace(s, path=("tower",) + s.path) for s in vision_param_specs(c.vision)]
    d, h = c.vision.hidden_size, c.text.hidden_size
    specs.append(ParamSpec(("projector", "mm_input_projection_weight"), (d, h), (None, None),
                           False))
    specs.append(ParamSpec(("projector", "mm_soft_emb_norm", "weight"), (d,), (None,), False))
    return specs


def image_features(c: Gemma3VisionConfig, params: Params, lora: Params | None,
                   project: Project, images: Mapping[str, jax.Array], attention_impl: Any = None,
                   remat: Any = None) -> jax.Array:
    """pixel_values [N, C, H, W] -> [N * mm_tokens_per_image, text hidden]."""
    h = encode(c.vision, params["tower"], images["pixel_values"], post_norm=True,
               lora=None if lora is None else lora.get("tower"), project=project,
               attention_impl=attention_impl, remat=remat)                      # [N,g*g,D]
    n, _, d = h.shape
    g, k = c.vision.grid, c.pool
    pooled = h.reshape(n, g // k, k, g // k, k, d).astype(jnp.float32).mean(axis=(2, 4))
    pooled = pooled.reshape(n, -1, d).astype(h.dtype)                           # [N,t,D]
    p = params["projector"]
    normed = rms_norm(pooled, p["mm_soft_emb_norm"]["weight"], eps=c.vision.layer_norm_eps,
                      offset=1.0)
    out = jnp.einsum("ntd,dh->nth", normed, p["mm_input_projection_weight"].astype(h.dtype))
    return out.reshape(-1, out.shape[-1])


GEMMA3_VLM = VisionArch(
    model_type="gemma3",
    architecture="Gemma3ForConditionalGeneration",
    parse_config=parse_config,
    config_to_hf=config_to_hf,
    vision_specs=vision_specs,
    tensor_part=functools.partial(tensor_part, what='Gemma 3'),
    image_features=image_features,
    image_blocks=True,
)
