"""Attention over a KV cache: the default (grouped XLA) form against the definition, and the
definition against the training attention on the same keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.ops.cached_attention import cached_attention, cached_attention_reference


def _inputs(t, dtype, *, b=3, s=24, hq=6, hkv=2, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    return q, k, v


@pytest.mark.parametrize("t,window,softcap,dtype,tol", [
    (1, None, None, jnp.float32, 1e-5),
    (1, 5, 2.0, jnp.float32, 1e-5),
    (3, 4, None, jnp.float32, 1e-5),
    (1, None, None, jnp.bfloat16, 2e-2),
])
def test_default_equals_reference(t, window, softcap, dtype, tol):
    q, k, v = _inputs(t, dtype)
    kv_start = jnp.asarray([0, 4, 9], jnp.int32)       # left padding of rows 1 and 2
    q_slot = jnp.asarray(13, jnp.int32)
    kw = dict(q_slot=q_slot, kv_start=kv_start, sliding_window=window, softcap=softcap,
              scale=0.3)
    ref = cached_attention_reference(q, k, v, **kw)
    out = jax.jit(lambda q, k, v: cached_attention(q, k, v, **kw))(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=tol, rtol=tol)
    assert float(jnp.abs(ref.astype(jnp.float32)).max()) > 0.1


def test_reference_equals_training_attention_on_the_filled_slots():
    """Queries at slots 10..12 over a cache holding slots 0..12 (rest garbage) attend exactly as
    causal attention over the 13-token sequence does at its last 3 positions."""
    q_all, k, v = _inputs(13, jnp.float32, s=13)
    garbage = jax.random.normal(jax.random.key(9), (3, 11, 2, 16))
    k_cache = jnp.concatenate([k, garbage], axis=1)
    v_cache = jnp.concatenate([v, garbage * 2], axis=1)
    full = flash_attention_reference(q_all, k, v, causal=True, sliding_window=6)
    got = cached_attention_reference(q_all[:, 10:], k_cache, v_cache,
                                     q_slot=jnp.asarray(10), kv_start=jnp.zeros(3, jnp.int32),
                                     sliding_window=6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full[:, 10:]), atol=1e-6)
