"""Qwen2.5-VL's vision tower, as pure functions over a nested dict of parameters.

Images enter as the rows the checkpoint's image processor (`Qwen2VLImageProcessor`) makes: one
row per patch of `temporal_patch_size` frames x `patch_size`^2 pixels x channels, flattened in
(channel, frame, row, column) order, the patches of each image laid out block-major over
`spatial_merge_size`^2 merge blocks; `grid_thw` gives each image's (frames, rows, columns) in
patches. The tower is

  patch embed (a linear map of each row: the Conv3d whose stride equals its kernel)
  -> `depth` blocks: x + attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x)) with biases; attention is
     bidirectional with a 2D rotary embedding (row / column of each patch), inside one window of
     `window_size` pixels square, except in the `fullatt_block_indexes` blocks, which attend over
     the whole frame
  -> patch merger: RMSNorm, each merge block's `spatial_merge_size`^2 patches concatenated, then
     Linear -> GELU -> Linear to `out_hidden_size`: one embedding per language-model image token.

Like transformers, the patches are reordered window by window before the blocks (so each window
is a contiguous run and attention kernels skip the blocks across windows) and the merged
embeddings are put back in the processor's order at the end. The reordering, rotary positions and
attention segments depend only on `grid_thw`; `vision_layout` computes them on the host.

Parameter tree (the HF checkpoint's `visual.` subtree with `blocks` -> `tower.layers` and
`merger` -> `projector`, blocks stacked on a leading axis L so one scanned block serves every
depth; E = hidden_size, I = intermediate_size, M = E * spatial_merge_size^2):

  tower.patch_embed.proj.weight          [E, C, Tp, P, P]   (Conv3d kernel; used as [E, K])
  tower.layers.norm1.weight              [L, E]
  tower.layers.attn.qkv.{weight,bias}    [L, 3E, E], [L, 3E]   (rows: q, k, v; heads x head_dim)
  tower.layers.attn.proj.{weight,bias}   [L, E, E], [L, E]
  tower.layers.norm2.weight              [L, E]
  tower.layers.mlp.{gate,up}_proj.{weight,bias}  [L, I, E], [L, I]
  tower.layers.mlp.down_proj.{weight,bias}       [L, E, I], [L, E]
  projector.ln_q.weight                  [E]
  projector.mlp.0.{weight,bias}          [M, M], [M]
  projector.mlp.2.{weight,bias}          [out, M], [out]

The LoRA projection plugs in as in the text decoder, on each block's `qkv`, `proj`, `gate_proj`,
`up_proj` and `down_proj` (the HF module names).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax import ops
from fastlora_jax.config import _Reader
from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.models.decoder import ParamSpec, Params, Project, frozen_project, rms_norm
from fastlora_jax.models.rope import apply_rope

# RMSNorm epsilon of every vision norm (fixed in transformers' Qwen2.5-VL, not a config key).
NORM_EPS = 1e-6
# The LoRA-targetable projections of one block: (group, HF module name).
VISION_PROJECTIONS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                      ("mlp", "down_proj"))


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
    """The vision tower's numbers (a Qwen2.5-VL `vision_config`).

    depth: blocks; hidden_size: E; intermediate_size: I of the SwiGLU MLP; num_heads: attention
    heads (head_dim = E / num_heads). in_channels, patch_size, temporal_patch_size: the patch a
    processor row holds. spatial_merge_size: m, an m x m block of patches becomes one language
    token. window_size: side of an attention window in pixels (a multiple of patch_size * m).
    fullatt_block_indexes: blocks that attend over the whole frame instead of a window.
    out_hidden_size: width of the merged embeddings (the language model's hidden size).
    rope_theta: base of the 2D rotary embedding. tokens_per_second: temporal spacing of video
    positions in M-RoPE (unused by still images). extras: harmless keys kept verbatim.
    """

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    tokens_per_second: int = 4
    extras: tuple[tuple[str, Any], ...] = ()

    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """K: values in one processor row."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches per language token (m^2)."""
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int:
        """Side of an attention window in merge blocks."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} must split into "
                              f"num_heads {self.num_heads} heads of a multiple of 4 dims (the 2D "
                              f"rotary embedding gives each axis a quarter of a head)")
        if self.window_units < 1:
            raise ConfigError(f"vision_config: window_size {self.window_size} is smaller than "
                              f"one merge block ({self.patch_size} x {self.spatial_merge_size} "
                              f"pixels)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision_config: fullatt_block_indexes {bad} are outside the "
                              f"{self.depth} blocks")


def parse_vision_config(hf: dict[str, Any], source: str) -> Qwen25VisionConfig:
    """A `vision_config` dict (transformers v4 or v5 spelling) -> Qwen25VisionConfig, refusing
    keys that would change the math and that we do not read."""
    r = _Reader(dict(hf), f"{source} (vision_config)")
    r.expect("hidden_act", ("silu",), "the Qwen2.5-VL vision MLP is SwiGLU with silu")
    patch = r.take("patch_size", int, 14)
    channels = r.take("in_channels", int, 3)
    # Hub checkpoints also carry `in_chans` / `spatial_patch_size`, which transformers ignores:
    # accept them only when they agree with the keys it reads.
    for legacy, value in (("in_chans", channels), ("spatial_patch_size", patch)):
        found = r.take(legacy, int, value)
        if found != value:
            raise ConfigError(f"{r.source}: key {legacy!r} = {found} disagrees with the value "
                              f"transformers uses ({value}); fix the config")
    rope = r.take("rope_parameters", dict, {})
    rope = dict(rope)
    kind = rope.pop("rope_type", "axial")
    theta = rope.pop("rope_theta", 10000.0)
    if kind != "axial" or rope or not isinstance(theta, (int, float)):
        raise ConfigError(f"{r.source}: rope_parameters {hf.get('rope_parameters')!r} are not "
                          f"supported (expected the axial 2D rope: rope_type 'axial' and a "
                          f"numeric rope_theta)")
    cfg = Qwen25VisionConfig(
        depth=r.take("depth", int, 32),
        hidden_size=r.take("hidden_size", int, 3584),
        intermediate_size=r.take("intermediate_size", int, 3420),
        num_heads=r.take("num_heads", int, 16),
        out_hidden_size=r.take("out_hidden_size", int, 3584),
        in_channels=channels,
        patch_size=patch,
        temporal_patch_size=r.take("temporal_patch_size", int, 2),
        spatial_merge_size=r.take("spatial_merge_size", int, 2),
        window_size=r.take("window_size", int, 112),
        fullatt_block_indexes=tuple(r.take("fullatt_block_indexes", list, [7, 15, 23, 31])),
        rope_theta=float(theta),
        tokens_per_second=r.take("tokens_per_second", int, 4),
    )
    r.finish("qwen2_5_vl vision")
    return dataclasses.replace(cfg, extras=r.extras())


def vision_to_hf(c: Qwen25VisionConfig) -> dict[str, Any]:
    """Inverse of `parse_vision_config` (transformers v5 spelling, which v4 also reads)."""
    out = dict(model_type="qwen2_5_vl_vision", depth=c.depth, hidden_size=c.hidden_size,
               hidden_act="silu", intermediate_size=c.intermediate_size, num_heads=c.num_heads,
               in_channels=c.in_channels, patch_size=c.patch_size,
               spatial_merge_size=c.spatial_merge_size, temporal_patch_size=c.temporal_patch_size,
               tokens_per_second=c.tokens_per_second, window_size=c.window_size,
               out_hidden_size=c.out_hidden_size,
               fullatt_block_indexes=list(c.fullatt_block_indexes),
               rope_parameters=dict(rope_type="axial", rope_theta=c.rope_theta))
    out.update({k: json.loads(v) for k, v in c.extras})
    return out


def vision_param_specs(c: Qwen25VisionConfig) -> list[ParamSpec]:
    """Every parameter of the tower and projector, in a stable order."""
    L, E, I, M = c.depth, c.hidden_size, c.intermediate_size, c.hidden_size * c.merge_unit
    specs = [ParamSpec(("tower", "patch_embed", "proj", "weight"),
                       (E, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size),
                       (None,) * 5, False)]

    def block(path: tuple[str, ...], shape: tuple[int, ...]) -> None:
        specs.append(ParamSpec(("tower", "layers") + path, (L,) + shape,
                               ("layers",) + (None,) * len(shape), True))

    block(("norm1", "weight"), (E,))
    for group, name, out, inp in (("attn", "qkv", 3 * E, E), ("attn", "proj", E, E),
                                  ("mlp", "gate_proj", I, E), ("mlp", "up_proj", I, E),
                                  ("mlp", "down_proj", E, I)):
        block((group, name, "weight"), (out, inp))
        block((group, name, "bias"), (out,))
    block(("norm2", "weight"), (E,))
    specs.append(ParamSpec(("projector", "ln_q", "weight"), (E,), (None,), False))
    for name, out, inp in (("0", M, M), ("2", c.out_hidden_size, M)):
        specs.append(ParamSpec(("projector", "mlp", name, "weight"), (out, inp), (None, None),
                               False))
        specs.append(ParamSpec(("projector", "mlp", name, "bias"), (out,), (None,), False))
    return specs


def tower_tensor_path(name: str) -> tuple[tuple[str, ...], int | None]:
    """A tensor name inside HF's `visual.` module -> (path in our vision tree, block or None):
    `blocks.3.attn.qkv.weight` -> (("tower", "layers", "attn", "qkv", "weight"), 3),
    `merger.mlp.0.bias` -> (("projector", "mlp", "0", "bias"), None)."""
    parts = tuple(name.split("."))
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        return ("tower", "layers") + parts[2:], int(parts[1])
    if parts[0] == "merger":
        return ("projector",) + parts[1:], None
    return ("tower",) + parts, None


def tower_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """Inverse of `tower_tensor_path`: the name inside HF's `visual.` module."""
    if path[0] == "projector":
        return "merger." + ".".join(path[1:])
    if path[1] == "layers":
        return f"blocks.{layer}." + ".".join(path[2:])
    return ".".join(path[1:])


# ---------------------------------------------------------------------------------------------
# Host-side layout of a batch of images

class VisionLayout(NamedTuple):
    """What `grid_thw` fixes, as int32 arrays (a pytree: pass it to a jitted `encode`).

    N patches in all, N / m^2 merged tokens:
      patch_order [N]: processor row of each patch in window order.
      positions [N, 2]: (row, column) of each patch in its frame, in window order.
      frame_ids [N]: attention segment of the full-attention blocks (one per frame), window order.
      window_ids [N]: attention segment of the windowed blocks, window order.
      token_order [N / m^2]: merged token in window order of each output token (processor order).
    """

    patch_order: np.ndarray
    positions: np.ndarray
    frame_ids: np.ndarray
    window_ids: np.ndarray
    token_order: np.ndarray


def vision_layout(config: Qwen25VisionConfig, grid_thw: Sequence[Sequence[int]]) -> VisionLayout:
    """The window order, rotary positions and attention segments of images with `grid_thw`
    [(frames, rows, columns) in patches per image], as transformers' Qwen2.5-VL computes them."""
    m, ws, mu = config.spatial_merge_size, config.window_units, config.merge_unit
    unit_order, positions, frame_ids, window_ids = [], [], [], []
    units_before = frames = windows = 0
    for index, thw in enumerate(grid_thw):
        t, h, w = (int(v) for v in thw)
        if min(t, h, w) < 1 or h % m or w % m:
            raise DataError(f"image {index}: grid_thw {tuple(thw)} must be positive with rows and "
                            f"columns multiples of spatial_merge_size {m}; take it from the "
                            f"checkpoint's image processor")
        mh, mw = h // m, w // m
        units = np.arange(t * mh * mw).reshape(t, mh, mw) + units_before
        # (row, column) of each patch in processor order: block-major over m x m blocks.
        bh, bw, ih, iw = np.meshgrid(np.arange(mh), np.arange(mw), np.arange(m), np.arange(m),
                                     indexing="ij")
        rc = np.stack([(bh * m + ih).reshape(-1), (bw * m + iw).reshape(-1)], axis=-1)
        for f in range(t):
            for r0 in range(0, mh, ws):
                for c0 in range(0, mw, ws):
                    block = units[f, r0:r0 + ws, c0:c0 + ws].reshape(-1)
                    unit_order.append(block)
                    window_ids.append(np.full(block.size * mu, windows))
                    windows += 1
            frame_ids.append(np.full(h * w, frames))
            frames += 1
            positions.append(rc)
        units_before += t * mh * mw
    if not unit_order:
        raise DataError("vision_layout: no images (grid_thw is empty)")
    units = np.concatenate(unit_order)                                    # [N / mu]
    patch_order = (units[:, None] * mu + np.arange(mu)).reshape(-1)       # [N]
    rc = np.concatenate(positions)[patch_order]                           # [N, 2]
    return VisionLayout(patch_order=patch_order.astype(np.int32), positions=rc.astype(np.int32),
                        frame_ids=np.concatenate(frame_ids).astype(np.int32),
                        window_ids=np.concatenate(window_ids).astype(np.int32),
                        token_order=np.argsort(units).astype(np.int32))


def num_image_tokens(config: Qwen25VisionConfig, grid_thw: Sequence[int]) -> int:
    """Language-model tokens of one image (its merged patches)."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // config.merge_unit


# ---------------------------------------------------------------------------------------------
# Forward

def rotary_tables(config: Qwen25VisionConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, head_dim] (float32) of the 2D rope for positions [N, 2] (row, column): the
    first quarter of the frequencies turns with the row, the second with the column, and the
    half repeats (rotate-half convention over the whole head)."""
    quarter = config.head_dim // 2
    inv = 1.0 / (config.rope_theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)  # [N,2,q/2]
    angles = angles.reshape(angles.shape[0], -1)                                       # [N, q]
    angles = jnp.concatenate([angles, angles], axis=-1)                                # [N, D]
    return jnp.cos(angles), jnp.sin(angles)


def _block(config: Qwen25VisionConfig, p: Params, lp: Params | None, h: jax.Array,
           cos: jax.Array, sin: jax.Array, segments: jax.Array, project: Project,
           attention_impl: Any) -> jax.Array:
    """One block over h [1, N, E] with attention inside `segments` [1, N]."""
    c = config
    _, N, E = h.shape

    def proj(x: jax.Array, group: str, name: str) -> jax.Array:
        sub = None if lp is None else (lp.get(group) or {}).get(name)
        return project(x, name, p[group][name], sub)

    x = rms_norm(h, p["norm1"]["weight"], eps=NORM_EPS, offset=0.0)
    qkv = proj(x, "attn", "qkv").reshape(1, N, 3, c.num_heads, c.head_dim)     # [1,N,3,h,D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                         # [1,N,h,D]
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    a = ops.attention(q, k, v, segment_ids=segments, causal=False, impl=attention_impl)
    h = h + proj(a.reshape(1, N, E), "attn", "proj")                            # [1,N,E]
    x = rms_norm(h, p["norm2"]["weight"], eps=NORM_EPS, offset=0.0)
    m = jax.nn.silu(proj(x, "mlp", "gate_proj")) * proj(x, "mlp", "up_proj")   # [1,N,I]
    return h + proj(m, "mlp", "down_proj")


def encode(config: Qwen25VisionConfig, params: Params, pixel_values: jax.Array,
           layout: VisionLayout, *, lora: Params | None = None,
           project: Project = frozen_project, attention_impl: Any = None,
           remat: Callable[[Callable], Callable] | None = None, dtype: Any = None) -> jax.Array:
    """Image-token embeddings [N / m^2, out_hidden_size] for processor rows pixel_values [N, K],
    in processor order (image after image), computed in `dtype` (default: the weights').

    `lora` is the tower's LoRA tree ({"layers": {group: {name: ...}}}, lora/layer.py's layout
    over the stacked blocks) for `project`; `remat` wraps the scanned block (training).
    """
    c = config
    N, K = pixel_values.shape
    if K != c.patch_dim or N != layout.patch_order.shape[0]:
        raise DataError(f"pixel_values has shape {pixel_values.shape}; the vision config and "
                        f"grid_thw expect [{layout.patch_order.shape[0]}, {c.patch_dim}] (rows "
                        f"of channels x temporal_patch_size x patch_size^2 from the processor)")
    tower = params["tower"]
    w_embed = tower["patch_embed"]["proj"]["weight"]
    dtype = dtype or w_embed.dtype
    x = jnp.take(pixel_values, jnp.asarray(layout.patch_order), axis=0).astype(dtype)  # [N,K]
    h = ops.linear(x, w_embed.reshape(c.hidden_size, K).astype(dtype))[None]           # [1,N,E]
    cos, sin = rotary_tables(c, jnp.asarray(layout.positions))                         # [N,D]
    cos, sin = cos[None], sin[None]                                                    # [1,N,D]
    full = jnp.asarray(np.isin(np.arange(c.depth), c.fullatt_block_indexes))           # [L]
    frames = jnp.asarray(layout.frame_ids)[None]                                       # [1,N]
    windows = jnp.asarray(layout.window_ids)[None]                                     # [1,N]

    def body(h: jax.Array, xs: tuple[Params, Params | None, jax.Array]) -> tuple[jax.Array, None]:
        p, lp, is_full = xs
        segments = jnp.where(is_full, frames, windows)
        return _block(c, p, lp, h, cos, sin, segments, project, attention_impl), None

    if remat is not None:
        body = remat(body)
    lora_layers = None if lora is None else lora.get("layers")
    h, _ = jax.lax.scan(body, h, (tower["layers"], lora_layers, full))
    merger = params["projector"]
    h = rms_norm(h[0], merger["ln_q"]["weight"], eps=NORM_EPS, offset=0.0)            # [N,E]
    h = h.reshape(N // c.merge_unit, c.hidden_size * c.merge_unit)                     # [N/mu,M]
    h = ops.linear(h, merger["mlp"]["0"]["weight"], merger["mlp"]["0"]["bias"])
    h = jax.nn.gelu(h, approximate=False)
    h = ops.linear(h, merger["mlp"]["2"]["weight"], merger["mlp"]["2"]["bias"])       # [N/mu,out]
    return jnp.take(h, jnp.asarray(layout.token_order), axis=0)
