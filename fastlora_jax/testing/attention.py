"""Random attention inputs, packed segment ids and the error measure of the attention tests and
benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def attention_inputs(seed: int, batch: int, seq_q: int, seq_kv: int, heads: int, kv_heads: int,
                     head_dim: int, dtype=jnp.bfloat16):
    """(q, k, v, do): q/do [batch, seq_q, heads, head_dim], k/v [batch, seq_kv, kv_heads, head_dim]
    (do stays float32: it is the cotangent)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (batch, seq_q, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (batch, seq_kv, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_kv, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (batch, seq_q, heads, head_dim), jnp.float32)
    return q, k, v, do


def max_rel_error(a: jax.Array, b: jax.Array) -> float:
    """max |a - b| / max |b|, in float64."""
    a = np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b).astype(jnp.float32), np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def packed_segment_ids(batch: int, seq: int, docs: int, seed: int) -> jax.Array:
    """Sorted segment ids [batch, seq]: `docs` documents of random lengths per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=docs - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seq), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)
