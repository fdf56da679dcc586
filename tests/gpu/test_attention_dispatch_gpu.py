"""The GPU default attention (cuDNN with local_window_size, our kernel for segments/softcap)
against the float32 reference, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("window, segments, softcap", [(256, False, None), (None, False, None),
                                                       (128, True, None), (None, False, 20.0)])
def test_gpu_default_matches_reference(window, segments, softcap):
    B, T, H, K, D = 2, 1024, 8, 2, 128
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, D)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, D)).astype(jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, H, D))
    seg = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), T // 4)[None].repeat(B, 0) if segments \
        else None
    kw = dict(segment_ids=seg, sliding_window=window, softcap=softcap)

    def loss(impl, q, k, v):
        return jnp.sum(ops.attention(q, k, v, impl=impl, **kw).astype(jnp.float32) * do)

    up = lambda x: x.astype(jnp.float32)
    out = ops.attention(q, k, v, **kw)
    ref = ops.attention(up(q), up(k), up(v), impl="reference", **kw)
    assert rel(out, ref) <= 1e-2
    grads = jax.grad(lambda *a: loss(None, *a), argnums=(0, 1, 2))(q, k, v)
    refs = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(up(q), up(k), up(v))
    for g, r in zip(grads, refs):
        assert rel(g, r) <= 1e-2
