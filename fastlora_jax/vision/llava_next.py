"""LLaVA-NeXT (`model_type: llava_next`): LLaVA's tower and projector over "anyres" tiles.

The processor (transformers' LlavaNextProcessor) picks for each image the best of the config's
`image_grid_pinpoints` (a (height, width) in pixels), cuts the resized, padded image into
tiles of the tower's `image_size` and puts a resized whole image (the base tile) first:
pixel_values [images, tiles, C, H, W] (tiles zero-padded to the batch's most) and image_sizes
[images, 2] (the original height, width). The model encodes every tile as LLaVA encodes an
image (`llava.tile_features`: feature layer, select strategy, projector), then lays out each
image's features as transformers' `LlavaNextModel.pack_image_features` does: the base tile's
tokens; then the grid tiles' tokens arranged back into one (rows x side) by (cols x side) map,
"unpadded" (the rows or columns that only cover the processor's padding are cut, so the map
keeps the original aspect ratio), each map row followed by the learned `image_newline` vector.

That layout depends only on image_sizes, so the host computes it (`host_inputs`) as a gather
index into the tiles' feature table (`feature_index`, -1 for the newline) and the jitted
forward only gathers. The processor expands each image placeholder to as many tokens as the
layout holds; `VisionLM.batch` checks the counts agree.

Training rows (`rows=True`): every example's tiles are padded to the most any pinpoint gives
(`pad_tiles`, so all rows share one tile axis), image_sizes [rows, images, 2] (zero for
padding images) and each row's `feature_index` [rows, most features] indexes its own tiles.

Tensor names: LLaVA's (`vision/names.py`) plus `model.image_newline` [text hidden].
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import _Reader
from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.models.decoder import ParamSpec, Params, Project
from fastlora_jax.vision import llava, names
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.llava import LlavaConfig

NEWLINE = -1  # feature_index entry of the image_newline vector
FEATURE_INDEX = "feature_index"
# transformers' LlavaNextConfig default (height, width) pinpoints
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_NEWLINE_NAME = re.compile(r"^(?:model\.)?image_newline$")


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    """A LLaVA-NeXT checkpoint's config.json, strictly read: LLaVA's fields plus the tile
    resolutions, (height, width) pixel multiples of the tower's image_size."""

    grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS

    @property
    def max_tiles(self) -> int:
        """Tiles of the largest grid, plus the base tile."""
        size = self.vision.image_size
        return 1 + max((h // size) * (w // size) for h, w in self.grid_pinpoints)


def parse_config(hf: Mapping[str, Any], source: str) -> LlavaNextConfig:
    r = _Reader(dict(hf), source)
    fields = llava.read_fields(r, source)
    vision = fields["vision"]
    raw = r.take("image_grid_pinpoints", list, [list(p) for p in DEFAULT_PINPOINTS])
    if not raw or not all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= vision.image_size
            and v % vision.image_size == 0 for v in p) for p in raw):
        raise ConfigError(f"{source}: image_grid_pinpoints={raw!r} must be a non-empty list of "
                          f"[height, width] pairs, each a multiple of the tower's image_size "
                          f"{vision.image_size}")
    r.expect("use_image_newline_parameter", (True,),
             "LLaVA-NeXT models always append the learned image_newline vector")
    tokens = vision.num_positions - (1 if fields["select_strategy"] == "default" else 0)
    if tokens != vision.grid ** 2:
        raise ConfigError(
            f"{source}: vision_feature_select_strategy={fields['select_strategy']!r} leaves "
            f"{tokens} features per tile, but LLaVA-NeXT arranges them in a {vision.grid} x "
            f"{vision.grid} grid; use 'default' for a tower with a CLS token (CLIP), 'full' "
            f"for one without (SigLIP)")
    r.finish("llava_next", llava.HARMLESS)
    return LlavaNextConfig(model_type="llava_next", extras=r.extras(),
                           grid_pinpoints=tuple((h, w) for h, w in raw), **fields)


def config_to_hf(c: LlavaNextConfig) -> dict[str, Any]:
    out = llava.fields_to_hf(c)
    out.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
               image_grid_pinpoints=[list(p) for p in c.grid_pinpoints])
    return dict(sorted(out.items()))


def vision_specs(c: LlavaNextConfig) -> list[ParamSpec]:
    return llava.vision_specs(c) + [
        ParamSpec(("image_newline",), (c.text.hidden_size,), (None,), False)]


def tensor_part(name: str) -> tuple[str, str] | None:
    if _NEWLINE_NAME.match(name):
        return "vision", "image_newline"
    return names.tensor_part(name, what="LLaVA-NeXT")


def tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    return "model.image_newline" if path == ("image_newline",) else names.tensor_name(path, layer)


def image_grid(c: LlavaNextConfig, size: tuple[int, int]) -> tuple[int, int]:
    """(tile rows, tile columns) of an image of `size` (height, width): the pinpoint the
    processor and transformers' model pick (transformers' own `select_best_resolution`)."""
    from transformers.image_processing_utils import select_best_resolution

    h, w = select_best_resolution(list(size), [list(p) for p in c.grid_pinpoints])
    return h // c.vision.image_size, w // c.vision.image_size


def image_index(c: LlavaNextConfig, size: tuple[int, int], tiles: int) -> np.ndarray:
    """One image's features as indexes into its own tiles' feature table [tiles * side^2]
    (NEWLINE: the image_newline vector): the base tile's, then the unpadded grid map row by
    row, each row ending in NEWLINE. `tiles`: the image's tile axis in pixel_values."""
    side = c.vision.grid
    per_tile = side * side
    rows, cols = image_grid(c, size)
    if 1 + rows * cols > tiles:
        raise DataError(f"an image of size {list(size)} (height, width) needs {1 + rows * cols} "
                        f"tiles under the model's image_grid_pinpoints {list(c.grid_pinpoints)}, "
                        f"but pixel_values hold {tiles} per image; build the inputs with the "
                        f"checkpoint's own processor")
    height, width = rows * side, cols * side
    orig_h, orig_w = size
    ys, xs = np.arange(height), np.arange(width)
    if orig_w / orig_h > width / height:   # wider than the map: cut rows top and bottom
        pad = (height - int(round(orig_h * (width / orig_w), 7))) // 2
        ys = ys[pad:height - pad]
    else:                                   # taller (or equal): cut columns left and right
        pad = (width - int(round(orig_w * (height / orig_h), 7))) // 2
        xs = xs[pad:width - pad]
    y, x = ys[:, None], xs[None, :]
    grid = (1 + (y // side) * cols + x // side) * per_tile + (y % side) * side + x % side
    grid = np.concatenate([grid, np.full((len(ys), 1), NEWLINE)], axis=1)
    return np.concatenate([np.arange(per_tile), grid.reshape(-1)])


def _images_index(c: LlavaNextConfig, sizes: np.ndarray, tiles: int) -> np.ndarray:
    """The concatenated indexes of images of `sizes` [images, 2] whose tiles follow each other
    (`tiles` each) in one feature table; all-zero sizes are padding images, skipped."""
    stride = tiles * c.vision.grid ** 2
    parts = [np.where(i == NEWLINE, NEWLINE, i + k * stride) for k, i in
             ((k, image_index(c, (int(s[0]), int(s[1])), tiles))
              for k, s in enumerate(sizes) if s.any())]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def host_inputs(c: LlavaNextConfig, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feature_index`, what image_sizes fix: [features] for a processor output
    (pixel_values [images, tiles, C, H, W], image_sizes [images, 2]), or [rows, most features]
    for training rows (pixel_values [rows, images, tiles, C, H, W], image_sizes
    [rows, images, 2]), each row's indexes local to its own tiles (padding: 0, never read)."""
    if "pixel_values" not in batch:
        return {}
    pixels = np.shape(batch["pixel_values"])
    sizes = batch.get("image_sizes")
    if sizes is None:
        raise DataError("pixel_values came without image_sizes; pass the LLaVA-NeXT "
                        "processor's whole output (it gives both)")
    sizes = np.asarray(sizes)
    if sizes.ndim == 3 and len(pixels) == 6:
        parts = [_images_index(c, row, pixels[2]) for row in sizes]
        index = np.zeros((len(parts), max(len(p) for p in parts)), np.int32)
        for row, part in enumerate(parts):
            index[row, :len(part)] = part
        return {FEATURE_INDEX: index}
    if sizes.ndim != 2 or len(pixels) != 5 or pixels[0] != sizes.shape[0]:
        raise DataError(f"LLaVA-NeXT inputs need pixel_values [images, tiles, C, H, W] and "
                        f"image_sizes [images, 2]; found shapes {list(pixels)} and "
                        f"{list(sizes.shape)}")
    return {FEATURE_INDEX: _images_index(c, sizes, pixels[1]).astype(np.int32)}


def image_features(c: LlavaNextConfig, params: Params, lora: Params | None, project: Project,
                   images: Mapping[str, jax.Array], attention_impl: Any = None,
                   remat: Any = None) -> jax.Array:
    """Every tile through `llava.tile_features`, then the packed layout gathered by
    `feature_index`: [features, text hidden] ([rows * most features, ...] for a 2-D index,
    whose rows each index their own share of the tiles)."""
    pixels = images["pixel_values"]
    x = llava.tile_features(c, params, lora, project, pixels.reshape((-1,) + pixels.shape[-3:]),
                            attention_impl, remat)                              # [M,S,H]
    table = x.reshape(-1, x.shape[-1])
    newline = table.shape[0]
    table = jnp.concatenate([table, params["image_newline"][None].astype(table.dtype)])
    index = images[FEATURE_INDEX]
    if index.ndim == 2:
        stride = newline // index.shape[0]
        index = index + stride * jnp.arange(index.shape[0], dtype=index.dtype)[:, None] * (
            index != NEWLINE)
    return table[jnp.where(index == NEWLINE, newline, index).reshape(-1)]


def pad_tiles(c: LlavaNextConfig, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One example's image arrays with pixel_values' tile axis zero-padded to `max_tiles`, so
    that examples of different grids stack into training rows."""
    pixels = arrays["pixel_values"]
    if pixels.ndim != 5 or pixels.shape[1] > c.max_tiles:
        raise DataError(f"pixel_values of shape {list(pixels.shape)} do not fit this "
                        f"LLaVA-NeXT model ([images, at most {c.max_tiles} tiles, C, H, W]); "
                        f"use the checkpoint's processor")
    pad = np.zeros((pixels.shape[0], c.max_tiles - pixels.shape[1]) + pixels.shape[2:],
                   pixels.dtype)
    return dict(arrays, pixel_values=np.concatenate([pixels, pad], axis=1))


LLAVA_NEXT = VisionArch(
    model_type="llava_next",
    architecture="LlavaNextForConditionalGeneration",
    parse_config=parse_config,
    config_to_hf=config_to_hf,
    vision_specs=vision_specs,
    tensor_part=tensor_part,
    tensor_name=tensor_name,
    image_features=image_features,
    input_keys=("pixel_values", "image_sizes"),
    host_inputs=host_inputs,
    example_arrays=pad_tiles,
)

__all__ = ["LLAVA_NEXT", "LlavaNextConfig"]
