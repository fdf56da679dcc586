"""The op dispatch: every implementation the platform offers follows the reference semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ops


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("segments", [False, True])
def test_xla_path_matches_reference(window, segments):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 24, 4, 16))
    k = jax.random.normal(ks[1], (2, 24, 2, 16))
    v = jax.random.normal(ks[2], (2, 24, 2, 16))
    seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24], jnp.int32) if segments else None
    kw = dict(segment_ids=seg, sliding_window=window, scale=0.3)
    ref = ops.attention(q, k, v, impl="reference", **kw)
    got = ops.attention(q, k, v, impl="xla", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)

