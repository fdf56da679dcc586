"""Qwen2.5-VL (`model_type: qwen2_5_vl`): the windowed ViT of `qwen2_5_vit.py` feeding a Qwen2
text decoder whose rotary embedding is multimodal (M-RoPE).

The text model is Qwen2's block (bias on q, k, v) with head_dim = hidden_size / heads and
`mrope_section` in its rope: each position is a triple (temporal, height, width). Text tokens
count 0, 1, 2, ... on all three axes; the tokens of an image take (start, start + row,
start + column) over its merged grid, where start is the position after the preceding text, and
the text after it resumes at start + max(rows, columns). `rope_positions` computes this on the
host from the token ids and each image's `image_grid_thw`, as transformers' `get_rope_index`
does; a text-only sequence gets the plain 0, 1, 2, ... positions.

Image embeddings (one per merged 2 x 2 patch block) replace the token embeddings at the
`<|image_pad|>` tokens, image after image in order, exactly as many as the processor expanded
(`vision/model.py` composes it; `QWEN2_5_VL` is the record it reads).

Tensor names: transformers >= 4.52 stores `model.visual.*`, `model.language_model.*` and
`lm_head.weight`; earlier checkpoints (most of the Hub) `visual.*`, `model.*` and
`lm_head.weight`. Both load; exports write the first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import ModelConfig, RopeKind, _Reader
from fastlora_jax.errors import CheckpointError, ConfigError, DataError
from fastlora_jax.models.decoder import Params, Project
from fastlora_jax.models.registry import config_from_hf, config_to_hf
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.qwen2_5_vit import (VISION_PROJECTIONS, Qwen25VisionConfig,
                                              VisionLayout, encode, num_image_tokens,
                                              parse_vision_config, tower_tensor_name,
                                              tower_tensor_path, vision_layout,
                                              vision_param_specs, vision_to_hf)

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
# transformers' default when a config has no mrope_section.
DEFAULT_MROPE_SECTION = (16, 24, 24)
# Keys of the composite config (beside text_config / vision_config).
_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# Keys that only name tokens or modules and never change the forward.
_HARMLESS = frozenset({"vision_token_id", "attn_implementation"})


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """A Qwen2.5-VL checkpoint: the text decoder, the vision tower and the special tokens.

    text: the decoder (a `qwen2` ModelConfig whose rope has `mrope_section`).
    vision: the tower and patch merger.
    image_token_id: `<|image_pad|>`, the placeholder an image embedding replaces.
    video_token_id / vision_start_token_id / vision_end_token_id: the other special tokens
      (videos are not supported: a video token in the input is an error).
    extras: harmless top-level keys kept verbatim (JSON-encoded) for `config_to_hf`.
    """

    text: ModelConfig
    vision: Qwen25VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    extras: tuple[tuple[str, str], ...] = ()
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size {self.vision.out_hidden_size} must "
                              f"equal the text hidden_size {self.text.hidden_size}: merged image "
                              f"embeddings replace token embeddings")


def parse_config(hf: Mapping[str, Any], source: str = "config.json") -> Qwen25VLConfig:
    """config.json of a Qwen2.5-VL checkpoint (transformers v4 flat or v5 nested text_config)
    -> Qwen25VLConfig; a key that would change the math and that we do not read is an error."""
    top = dict(hf)
    if top.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type {top.get('model_type')!r} is not "
                          f"{MODEL_TYPE!r}")
    top.pop("model_type")
    top.pop("architectures", None)
    vision = top.pop("vision_config", None)
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: 'vision_config' must be a JSON object, found {vision!r}")
    text = top.pop("text_config", None)
    tokens = {k: top.pop(k) for k in _TOKEN_KEYS if top.get(k) is not None}
    tie = top.pop("tie_word_embeddings", None)
    if text is None:  # v4: the text model's keys sit at the top level
        text, top = top, {}
    elif not isinstance(text, dict):
        raise ConfigError(f"{source}: 'text_config' must be a JSON object, found {text!r}")
    text = dict(text)
    for key in _TOKEN_KEYS:  # some saves repeat (or null) the token ids inside text_config
        value = text.pop(key, None)
        if value is not None and tokens.setdefault(key, value) != value:
            raise ConfigError(f"{source}: {key} is {tokens[key]} at the top level but {value} in "
                              f"text_config; fix the config")
    text_tie = text.pop("tie_word_embeddings", None)
    text["tie_word_embeddings"] = bool(tie) or bool(text_tie)  # transformers: either one ties
    for key in _HARMLESS:
        text.pop(key, None)
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if "head_dim" in text and isinstance(hidden, int) and isinstance(heads, int) and heads and (
            text["head_dim"] != hidden // heads):
        raise ConfigError(f"{source}: text head_dim {text['head_dim']} differs from hidden_size / "
                          f"num_attention_heads = {hidden // heads}, which transformers' "
                          f"Qwen2.5-VL uses; remove head_dim")
    text_cfg = config_from_hf(dict(text, model_type="qwen2"), source=f"{source} (text model)")
    rope = text_cfg.rope
    if rope.mrope_section is None:
        rope = dataclasses.replace(rope, mrope_section=DEFAULT_MROPE_SECTION)
        if sum(DEFAULT_MROPE_SECTION) * 2 != text_cfg.head_dim or rope.kind is not (
                RopeKind.DEFAULT):
            raise ConfigError(f"{source}: no mrope_section in the rope parameters, and "
                              f"transformers' default {list(DEFAULT_MROPE_SECTION)} does not fit "
                              f"head_dim {text_cfg.head_dim} with rope type "
                              f"{rope.kind.value!r}; add rope_scaling.mrope_section (with "
                              f"default frequencies)")
        text_cfg = dataclasses.replace(text_cfg, rope=rope)
    r = _Reader(top, source)
    r.finish(MODEL_TYPE, _HARMLESS)
    return Qwen25VLConfig(text=text_cfg, vision=parse_vision_config(vision, source),
                          extras=r.extras(), **tokens)


def to_hf_config(config: Qwen25VLConfig) -> dict[str, Any]:
    """The config.json of a merged export (transformers v5 layout, nested text_config)."""
    text = config_to_hf(config.text)
    text.pop("architectures")
    tie = text.pop("tie_word_embeddings")
    text["model_type"] = "qwen2_5_vl_text"
    out: dict[str, Any] = {k: json.loads(v) for k, v in config.extras}
    out.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], text_config=text,
               vision_config=vision_to_hf(config.vision), tie_word_embeddings=tie,
               image_token_id=config.image_token_id, video_token_id=config.video_token_id,
               vision_start_token_id=config.vision_start_token_id,
               vision_end_token_id=config.vision_end_token_id)
    return out


# ---------------------------------------------------------------------------------------------
# Tensor names

def tensor_part(name: str) -> tuple[str, str]:
    """A stored tensor name -> ("language", the text model's HF name, e.g.
    `model.layers.0.mlp.up_proj.weight`) or ("vision", the dotted path in our vision tree with
    a block's index after `layers`, e.g. `tower.layers.3.attn.qkv.weight`)."""
    for prefix in ("model.visual.", "visual."):
        if name.startswith(prefix):
            path, layer = tower_tensor_path(name[len(prefix):])
            if layer is not None:
                path = path[:2] + (str(layer),) + path[2:]
            return "vision", ".".join(path)
    if name.startswith("model.language_model."):
        return "language", "model." + name[len("model.language_model."):]
    if name == "lm_head.weight" or name.startswith("model."):
        return "language", name
    raise CheckpointError(f"tensor {name!r} is not part of a Qwen2.5-VL checkpoint (expected "
                          f"names under model.visual., model.language_model., visual., model. "
                          f"or lm_head.)")


def tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """The HF name a merged export writes for vision-tree `path` (block `layer`)."""
    return "model.visual." + tower_tensor_name(path, layer)


# ---------------------------------------------------------------------------------------------
# The processor

def load_processor(folder: str | pathlib.Path) -> Any:
    """The checkpoint's AutoProcessor. transformers builds Qwen2.5-VL's processor with a video
    processor, which needs torch and torchvision and its own config file; without them it is
    built without one (images and text, through transformers' own processor code; videos are
    not supported here anyway)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder))
    except (ImportError, OSError):
        return _images_only_processor().from_pretrained(str(folder))


@functools.cache
def _images_only_processor() -> type:
    from transformers import Qwen2_5_VLProcessor as Full

    class Qwen2_5_VLProcessor(Full):  # the same name, so saved processors name the real class
        """transformers' Qwen2_5_VLProcessor with only its image processor and tokenizer."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                     chat_template: Any = None, **kwargs: Any) -> None:
            super().__init__(image_processor=image_processor, tokenizer=tokenizer,
                             chat_template=chat_template, **kwargs)

    return Qwen2_5_VLProcessor


# ---------------------------------------------------------------------------------------------
# M-RoPE positions

def rope_positions(config: Qwen25VLConfig, input_ids: np.ndarray,
                   image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
                   attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions [3, B, T] int32, rope_deltas [B] int32) for input_ids [B, T], as
    transformers' `get_rope_index` for images: each run of consecutive image tokens is the next
    image of `image_grid_thw` (rows in batch order). Padding (attention_mask 0) is skipped and
    gets position 0. rope_deltas = (last position + 1) - real length: decoding continues at
    (tokens so far) + delta on every axis."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise DataError(f"input_ids must be [batch, seq], found shape {ids.shape}")
    B, T = ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if (ids[mask] == config.video_token_id).any():
        raise DataError(f"input_ids hold the video token {config.video_token_id}: Qwen2.5-VL "
                        f"videos are not supported, only images")
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw]
    m = config.vision.spatial_merge_size
    positions = np.zeros((3, B, T), np.int64)
    deltas = np.zeros((B,), np.int64)
    used = 0
    for b in range(B):
        row = ids[b][mask[b]]
        is_image = row == config.image_token_id
        pieces, start = [], 0
        # runs of equal kind: boundaries where is_image changes
        edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(row)]):
            if not is_image[lo]:
                pieces.append(np.broadcast_to(np.arange(hi - lo) + start, (3, hi - lo)))
                start += hi - lo
                continue
            if used >= len(grids):
                raise DataError(f"row {b}: more runs of image tokens than images "
                                f"({len(grids)} in image_grid_thw); every image needs exactly "
                                f"its placeholder tokens")
            t, h, w = grids[used]
            used += 1
            if hi - lo != num_image_tokens(config.vision, (t, h, w)):
                raise DataError(f"row {b}: a run of {hi - lo} image tokens for an image of grid "
                                f"{(t, h, w)}, which has "
                                f"{num_image_tokens(config.vision, (t, h, w))}; expand the "
                                f"placeholders with the checkpoint's processor")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m),
                                     indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + start)
            start += max(h, w) // m
        row_pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = row_pos
        deltas[b] = (row_pos.max() + 1 - len(row)) if len(row) else 0
    if used != len(grids):
        raise DataError(f"image_grid_thw has {len(grids)} images but input_ids hold {used} runs "
                        f"of image tokens; the conversation's images and placeholders disagree")
    return positions.astype(np.int32), deltas.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The forward

# Batch keys of the vision tower's layout arrays: "vision_" + the VisionLayout field.
LAYOUT_PREFIX = "vision_"
# Batch key of the per-row M-RoPE positions [B, 3, T] (rows slice along the first axis).
MROPE_POSITIONS = "mrope_positions"


def image_features(config: Qwen25VLConfig, params: Params, lora: Params | None,
                   project: Project, images: Mapping[str, jax.Array], attention_impl: Any,
                   remat: Callable[[Callable], Callable] | None) -> jax.Array:
    """Image embeddings [image tokens, text hidden] of a batch's images, in image order.

    images: `pixel_values` [N, K] (the processor's rows) and the `VisionLayout` arrays that
    `host_inputs` derived from `image_grid_thw` (as `vision_<field>`): one layout [N, ...], or
    for training rows one per row [B, N / B, ...], when the features come row after row, each
    row's padding after its images."""
    layout = VisionLayout(*(images[LAYOUT_PREFIX + key] for key in VisionLayout._fields))
    if layout.patch_order.ndim == 2:  # training rows: one layout per row, [B, P, ...]
        layout = _joined_layouts(layout)
    return encode(config.vision, params, images["pixel_values"], layout,
                  lora=None if lora is None else lora.get("tower"), project=project,
                  attention_impl=attention_impl, remat=remat)


def _joined_layouts(rows: VisionLayout) -> VisionLayout:
    """One layout for B rows' images in row order from per-row layouts [B, P, ...] (each row's
    images padded to P patches, `row_layout`): indexes shifted past the rows before, segment
    ids made distinct (a row's ids lie in [0, P))."""
    B, P = rows.patch_order.shape
    shift = (jnp.arange(B, dtype=jnp.int32) * P)[:, None]                  # [B, 1]
    tokens = rows.token_order.shape[1]
    return VisionLayout(
        patch_order=(rows.patch_order + shift).reshape(-1),
        positions=rows.positions.reshape(B * P, 2),
        frame_ids=(rows.frame_ids + shift).reshape(-1),
        window_ids=(rows.window_ids + shift).reshape(-1),
        token_order=(rows.token_order + shift // P * tokens).reshape(-1))


def text_positions(config: Qwen25VLConfig, input_ids: jax.Array,
                   batch: Mapping[str, jax.Array]) -> jax.Array | None:
    """The text decoder's positions: M-RoPE [3, B, T] from the batch's per-row
    `mrope_positions` [B, 3, T] (`host_inputs`), else None (0..T-1: text only)."""
    del config, input_ids
    rows = batch.get(MROPE_POSITIONS)
    return None if rows is None else jnp.moveaxis(rows, 1, 0)


def row_layout(config: Qwen25VisionConfig, grids: np.ndarray, patches: int) -> VisionLayout:
    """The layout of one training row's images, padded to `patches` patch rows: `grids`
    [images, 3] with all-zero rows for padded images (dropped). The real patches come first, as
    `vision_layout` lays them out; the padded ones keep their processor order at the end, in an
    attention segment of their own (id patches - 1, which no real window or frame of the row
    reaches: a row has fewer windows and frames than real patches), and the padded merged tokens
    end `token_order`, so the row's real features come first and the padding is never read."""
    real = [g for g in np.asarray(grids).tolist() if any(g)]
    n = sum(t * h * w for t, h, w in real)
    if n > patches or (patches - n) % config.merge_unit:
        raise DataError(f"a row's images have {n} patches, but its pixel rows hold {patches}; "
                        f"build training rows with train/vision_data.py")
    pad = np.arange(n, patches, dtype=np.int32)
    seg = np.full(patches - n, patches - 1, np.int32)
    padding = VisionLayout(patch_order=pad, positions=np.zeros((patches - n, 2), np.int32),
                           frame_ids=seg, window_ids=seg,
                           token_order=pad[::config.merge_unit] // config.merge_unit)
    parts = [vision_layout(config, real), padding] if real else [padding]
    return VisionLayout(*(np.concatenate(field) for field in zip(*parts)))


def host_inputs(config: Qwen25VLConfig, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `image_grid_thw` fixes, computed on the host before a jitted forward: the vision
    tower's layout arrays, the M-RoPE positions of `input_ids` per row (`mrope_positions`
    [B, 3, T], with `attention_mask` when the batch has one) and the `rope_deltas` [B]
    generation continues from.

    Training rows (image_grid_thw [rows, images, 3], pixel_values [rows, patches, K], each row
    padded: `train/vision_data.py`) get one `row_layout` per row [rows, patches, ...] (patches:
    the pixel rows' second axis, or without them the most a row's grids need) and positions
    from their real grids; a processor output (image_grid_thw [images, 3]) gets one
    layout for the batch's images."""
    grid = batch.get("image_grid_thw")
    out: dict[str, np.ndarray] = {}
    if grid is not None and np.ndim(grid) == 3:
        grid = np.asarray(grid)
        patches = (np.shape(batch["pixel_values"])[1] if "pixel_values" in batch
                   else int(np.prod(grid, axis=-1).sum(axis=-1).max()))
        layouts = [row_layout(config.vision, g, patches) for g in grid]
        out.update({LAYOUT_PREFIX + k: np.stack([getattr(layout, k) for layout in layouts])
                    for k in VisionLayout._fields})
        grid = [g for g in grid.reshape(-1, 3).tolist() if any(g)]
    elif grid is not None and len(grid):
        layout = vision_layout(config.vision, np.asarray(grid).tolist())
        out.update({LAYOUT_PREFIX + k: v for k, v in layout._asdict().items()})
    positions, out["rope_deltas"] = rope_positions(
        config, np.asarray(batch["input_ids"]), grid, batch.get("attention_mask"))
    out[MROPE_POSITIONS] = np.moveaxis(positions, 0, 1)
    return out


QWEN2_5_VL = VisionArch(
    model_type=MODEL_TYPE,
    architecture=ARCHITECTURE,
    parse_config=parse_config,
    config_to_hf=to_hf_config,
    vision_specs=lambda config: vision_param_specs(config.vision),
    tensor_part=tensor_part,
    tensor_name=tensor_name,
    vision_layers="model.visual.blocks",
    vision_projections=VISION_PROJECTIONS,
    image_features=image_features,
    host_inputs=host_inputs,
    load_processor=load_processor,
    positions=text_positions,
)

__all__ = ["QWEN2_5_VL", "Qwen25VLConfig", "parse_config", "rope_positions", "row_layout"]
