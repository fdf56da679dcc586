"""Attention of a few new queries over a preallocated KV cache (the decode step's attention).

Shapes: q [batch, T, heads, head_dim] holds the queries of cache slots q_slot .. q_slot + T - 1;
k, v [batch, S, kv_heads, head_dim] are one layer's cache (slot-major, the new keys already
written); kv_start [batch] int32 is each row's first real slot (slots before it hold left
padding). The query of slot i in row b sees key slot j iff

    kv_start[b] <= j <= i   and   (window is None or j > i - window),

so slots not written yet (j > i) are never read. Scores are `scale * q.k`, then
`softcap * tanh(s / softcap)`, then masked; the softmax is float32; the output has q's dtype.
A query whose row has no visible key (only possible for a padding query) yields zeros.

`cached_attention_reference` is the definition; `cached_attention` the default (plain XLA,
grouped so that a key is read once for all the query heads sharing it, no float32 copy of the
cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.ops import defaults
from fastlora_jax.ops.impl import Impl, as_impl


def cache_mask(q_len: int, cache_len: int, *, q_slot: jax.Array, kv_start: jax.Array,
               sliding_window: int | None) -> jax.Array:
    """Boolean [batch, q_len, cache_len] (True = visible), as in the module docstring."""
    qi = (q_slot + jnp.arange(q_len, dtype=jnp.int32))[None, :, None]   # [1, T, 1]
    kj = jnp.arange(cache_len, dtype=jnp.int32)[None, None, :]          # [1, 1, S]
    mask = (kj <= qi) & (kj >= kv_start[:, None, None])
    if sliding_window is not None:
        mask &= kj > qi - sliding_window
    return mask


def cached_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slot: jax.Array,
                               kv_start: jax.Array, sliding_window: int | None = None,
                               softcap: float | None = None,
                               scale: float | None = None) -> jax.Array:
    """The definition: every head separately, float32 throughout."""
    batch, t, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    kf = jnp.repeat(k.astype(jnp.float32), groups, axis=2)               # [B, S, Hq, D]
    vf = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * scale  # [B, Hq, T, S]
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = cache_mask(t, k.shape[1], q_slot=q_slot, kv_start=kv_start,
                      sliding_window=sliding_window)[:, None]               # [B, 1, T, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bhts,bshd->bthd", p, vf)
    return o.astype(q.dtype)


def _grouped(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slot: jax.Array,
             kv_start: jax.Array, sliding_window: int | None, softcap: float | None,
             scale: float | None) -> jax.Array:
    """Query heads grouped by their kv head; products in the cache's dtype with float32
    accumulation, softmax in float32."""
    batch, t, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, t, kv_heads, groups, head_dim)
    s = jnp.einsum("btkgd,bskd->bkgts", qg.astype(k.dtype), k,
                   preferred_element_type=jnp.float32) * scale           # [B, Hkv, G, T, S]
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = cache_mask(t, k.shape[1], q_slot=q_slot, kv_start=kv_start,
                      sliding_window=sliding_window)[:, None, None]         # [B, 1, 1, T, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))                  # masked: exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    return o.reshape(batch, t, heads, head_dim).astype(q.dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slot: jax.Array,
                     kv_start: jax.Array, sliding_window: int | None = None,
                     softcap: float | None = None, scale: float | None = None,
                     impl: Impl | str | None = None) -> jax.Array:
    """Attention of q over the cache k / v (module docstring). impl: REFERENCE for the
    definition; anything else (and the default everywhere) runs the grouped XLA form."""
    which = as_impl(impl, "cached_attention") or defaults.cached_attention_impl()
    fn = cached_attention_reference if which is Impl.REFERENCE else _grouped
    return fn(q, k, v, q_slot=jnp.asarray(q_slot, jnp.int32),
              kv_start=jnp.asarray(kv_start, jnp.int32), sliding_window=sliding_window,
              softcap=softcap, scale=scale)
