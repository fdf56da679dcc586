"""The vision-language forward as pure functions over (frozen, lora), for every architecture.

The record (`vision/arch.py`) turns the batch's images into embeddings of the text model's width;
they replace the token embeddings at the image placeholder tokens, in order; the shared text
decoder (`models/decoder.py`) runs on those embeddings, with each image's tokens attending to
each other both ways where the architecture says so (Gemma 3).

    logits = forward(arch, config, spec, frozen, lora, batch)   # batch: input_ids + processor outputs

Two batch forms. Inference (a processor output, `VisionLM.batch`): the image arrays are the
batch's images in order, flat ([images, C, H, W]; Qwen2.5-VL [patches, K]), and the k-th image
token of the batch, counted row after row, takes the k-th feature (`scatter_images`). Training
rows (`rows=True`, `train/vision_data.py`): every image array has a leading row axis, each row's
images zero-padded to the dataset's most ([B, images, C, H, W]; Qwen2.5-VL [B, patches, K]), and
the k-th image token of a row takes that row's k-th feature (`scatter_rows`), so rows with
different numbers (and, for Qwen2.5-VL, sizes) of images share one batch and padded images are
never read.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fastlora_jax.lora.layer import lora_project, with_constants
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params, frozen_project
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.lora import VisionLoraSpec


def scatter_images(embeds: jax.Array, input_ids: jax.Array, image_token_id: int,
                   features: jax.Array) -> jax.Array:
    """embeds [B, T, H] with the k-th image token (row-major) replaced by features[k] [N, H].

    The batch must hold exactly N image tokens: the processor expands each image into its
    placeholders, the collator refuses a truncation that would cut them and `VisionLM.batch`
    checks them; here extra tokens would repeat the last feature row."""
    flat = scatter_rows(embeds.reshape(1, -1, embeds.shape[-1]), input_ids.reshape(1, -1),
                        image_token_id, features[None])     # the batch as one row
    return flat.reshape(embeds.shape)


def scatter_rows(embeds: jax.Array, input_ids: jax.Array, image_token_id: int,
                 features: jax.Array) -> jax.Array:
    """embeds [B, T, H] with the k-th image token of row b replaced by features[b, k]
    ([B, K, H]: each row's image features in order, padded to K).

    A row holds at most K image tokens (`train/vision_data.py` pads to the dataset's most
    images per row); its features past its own image tokens (padding) are never read."""
    mask = input_ids == image_token_id                                          # [B,T]
    index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, max(features.shape[1] - 1, 0))
    picked = jnp.take_along_axis(features, index[..., None], axis=1)            # [B,T,H]
    return jnp.where(mask[..., None], picked.astype(embeds.dtype), embeds)


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
                     linear_impl: Any = None, remat: Any = None, rows: bool = False
                     ) -> tuple[jax.Array, jax.Array | None]:
    """(inputs_embeds [B, T, H] with the images in place, bidirectional ids [B, T] or None).

    rows: the image arrays carry a leading row axis (training rows, see the module's
    docstring); else they are the batch's images, flat."""
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
    if not rows:
        features = arch.image_features(config, frozen["vision"], vis_lora, vis_proj, batch,
                                       attention_impl, remat)                       # [N,H]
        return scatter_images(embeds, ids, config.image_token_id, features), blocks
    # every row holds as many (padded) images, so the flat features split evenly by row
    pixels = batch["pixel_values"]
    flat = dict(batch, pixel_values=pixels.reshape((-1,) + pixels.shape[2:]))
    features = arch.image_features(config, frozen["vision"], vis_lora, vis_proj, flat,
                                   attention_impl, remat)                           # [B*K,H]
    features = features.reshape(ids.shape[0], -1, features.shape[-1])               # [B,K,H]
    return scatter_rows(embeds, ids, config.image_token_id, features), blocks


def hidden_states(arch: VisionArch, config: Any, spec: VisionLoraSpec | None, frozen: Params,
                  lora: Params | None, batch: Mapping[str, jax.Array], *,
                  dropout_key: jax.Array | None = None, attention_impl: Any = None,
                  linear_impl: Any = None, remat: Any = None, rows: bool = False) -> jax.Array:
    """Final-normed hidden states [B, T, H] of the text decoder for one batch (input_ids
    [B, T] int32, the processor's image arrays, optional positions / segment_ids [B, T]);
    `rows` as in `input_embeddings`."""
    lang_lora, lang_proj, _, _ = _parts(spec, lora, dropout_key, linear_impl)
    embeds, blocks = input_embeddings(arch, config, spec, frozen, lora, batch,
                                      dropout_key=dropout_key, attention_impl=attention_impl,
                                      linear_impl=linear_impl, remat=remat, rows=rows)
    positions = (batch.get("positions") if arch.positions is None
                 else arch.positions(config, batch["input_ids"], batch))
    return decoder.hidden_states(
        config.text, frozen["language"], batch["input_ids"], positions=positions,
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
