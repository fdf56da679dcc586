"""Rotary position embeddings (half-split / NeoX convention, as transformers' `rotate_half`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import ModelConfig, RopeConfig, RopeKind, rotary_dim
from fastlora_jax.errors import ConfigError


def base_inv_freq(config: ModelConfig, rope: RopeConfig | None = None) -> np.ndarray:
    """Static inverse frequencies [rot/2] (float32) of `rope` (default config.rope), with linear /
    llama3 scaling applied."""
    rope = rope or config.rope
    dim = rotary_dim(config, rope)
    inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    if rope.kind is RopeKind.LINEAR:
        inv = inv / rope.factor
    elif rope.kind is RopeKind.LLAMA3:
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def cos_sin(config: ModelConfig, positions: jax.Array, rope: RopeConfig | None = None, *,
            seq_len: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch, seq, rot] (float32) for integer positions [batch, seq], under
    `rope` (default config.rope; a layer's is `config.layer_rope(i)`). Positions
    [3, batch, seq] (temporal, height, width) give M-RoPE (`mrope_cos_sin`).

    `seq_len` is the sequence length that dynamic and LongRoPE scaling key on: by default
    max(positions) + 1 over the whole batch (transformers' rule); the KV-cache decoder passes
    each row's own length, int32 [batch], so a row's result does not depend on its batch.
    """
    rope = rope or config.rope
    if positions.ndim == 3:
        return mrope_cos_sin(config, positions, rope)
    dim = rotary_dim(config, rope)
    inv = jnp.asarray(base_inv_freq(config, rope))
    scale = 1.0
    if seq_len is None:
        seq_len = jnp.max(positions) + 1
    else:
        seq_len = jnp.asarray(seq_len).reshape(-1, 1, 1)  # [batch, 1, 1] against [B, T, rot/2]
    if rope.kind is RopeKind.DYNAMIC:
        # NTK-aware base growth once the sequence outgrows the trained context.
        max_pos = rope.original_max_position_embeddings or config.max_position_embeddings
        grown = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (
            dim / (dim - 2))
        theta = jnp.where(seq_len > max_pos, grown, rope.theta)
        inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    elif rope.kind is RopeKind.LONGROPE:
        orig = rope.original_max_position_embeddings or config.max_position_embeddings
        short = jnp.asarray(rope.short_factor, jnp.float32)
        long = jnp.asarray(rope.long_factor, jnp.float32)
        ext = jnp.where(seq_len > orig, long, short)
        inv = 1.0 / (ext * rope.theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        scale = longrope_attention_factor(config, rope)
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, rot/2]
    angles = jnp.concatenate([angles, angles], axis=-1)     # [B, T, rot]
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def mrope_cos_sin(config: ModelConfig, positions: jax.Array,
                  rope: RopeConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """Multimodal rope (Qwen2-VL / Qwen2.5-VL): cos, sin [batch, seq, rot] (float32) for
    positions [3, batch, seq]. Frequency j of section i (`rope.mrope_section`) turns with
    position axis i % 3; with the three axes equal this is the 1D rope of `cos_sin`."""
    rope = rope or config.rope
    if rope.mrope_section is None:
        raise ConfigError(f"positions of shape {tuple(positions.shape)} (3D, multimodal) need a "
                          f"rope with mrope_section; this {config.model_type!r} config has none")
    inv = jnp.asarray(base_inv_freq(config, rope))                       # [rot/2]
    axis = np.repeat(np.arange(len(rope.mrope_section)) % 3, rope.mrope_section)  # [rot/2]
    chosen = jnp.moveaxis(positions[axis], 0, -1)                        # [B, T, rot/2]
    angles = chosen.astype(jnp.float32) * inv                            # [B, T, rot/2]
    angles = jnp.concatenate([angles, angles], axis=-1)                  # [B, T, rot]
    return jnp.cos(angles), jnp.sin(angles)


def longrope_attention_factor(config: ModelConfig, rope: RopeConfig | None = None) -> float:
    """LongRoPE's multiplier on cos and sin: `attention_factor` if set, else
    sqrt(1 + ln(factor) / ln(orig)) (1 when factor <= 1), factor defaulting to max_pos / orig."""
    rope = rope or config.rope
    if rope.attention_factor is not None:
        return rope.attention_factor
    orig = rope.original_max_position_embeddings or config.max_position_embeddings
    factor = rope.factor if rope.factor is not None else config.max_position_embeddings / orig
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(orig))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first `rot` dims of each head. x [B, T, heads, D]; cos/sin [B, T, rot]."""
    rot = cos.shape[-1]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    xr, xpass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = (xr * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, xpass], axis=-1) if xpass.shape[-1] else out
