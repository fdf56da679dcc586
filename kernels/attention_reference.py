"""The math that every attention implementation must reproduce (pure jnp, float32 inside).

Shapes: q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim];
heads % kv_heads == 0 (query head h reads kv head h // (heads // kv_heads)). Output is q's shape and
dtype. Who sees whom: `attention_mask.py`. Scores are `scale * q.k`, then
`softcap * tanh(s / softcap)` when softcap is set, then masked. A query row with no visible key
yields zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.kernels.attention_mask import dense_mask


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                              causal: bool = True,
                              segment_ids: jax.Array | None = None,
                              kv_segment_ids: jax.Array | None = None,
                              sliding_window: int | None = None,
                              softcap: float | None = None,
                              scale: float | None = None,
                              bidirectional_ids: jax.Array | None = None) -> jax.Array:
    """Reference attention. segment_ids [batch, seq_q] int32 (kv_segment_ids defaults to it);
    bidirectional_ids [batch, seq] int32 as in `attention_mask.dense_mask`."""
    batch, seq_q, heads, head_dim = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    qf = q.astype(jnp.float32).reshape(batch, seq_q, kv_heads, groups, head_dim)
    # s: [batch, kv_heads, groups, seq_q, seq_kv]
    s = jnp.einsum("bqkgd,bskd->bkgqs", qf, k.astype(jnp.float32)) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = dense_mask(seq_q, seq_kv, causal=causal, sliding_window=sliding_window,
                      q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                      bidirectional_ids=bidirectional_ids)
    mask = mask[:, :, None]  # [b|1, 1, 1, q, s]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(jnp.float32))
    return o.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)
