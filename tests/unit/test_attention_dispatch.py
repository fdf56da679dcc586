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



def test_reference_path_recomputes_scores_in_the_backward():
    """ops.attention's reference path (the CPU default) keeps no [B, H, T, T] array for its
    backward, and its gradients are those of the plain reference's autodiff."""
    import contextlib
    import io
    import re

    from fastlora_jax.kernels.attention_reference import flash_attention_reference

    ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4)
    q = jax.random.normal(ks[0], (2, 40, 4, 16))
    k = jax.random.normal(ks[1], (2, 40, 2, 16))
    v = jax.random.normal(ks[2], (2, 40, 2, 16))
    g = jax.random.normal(ks[3], (2, 40, 4, 16))
    seg = jnp.asarray([[1] * 15 + [2] * 25, [1] * 40], jnp.int32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    ours = loss(lambda q, k, v: ops.attention(q, k, v, segment_ids=seg, softcap=20.0,
                                              impl="reference"))
    plain = loss(lambda q, k, v: flash_attention_reference(q, k, v, segment_ids=seg,
                                                           softcap=20.0))
    for got, want in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    def square_residuals(f) -> list[str]:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            jax.ad_checkpoint.print_saved_residuals(f, q, k, v)
        return [line for line in text.getvalue().splitlines()
                if re.match(r"\s*\w+\[[\d,]*40,40\]", line)]

    assert square_residuals(plain), "the plain reference keeps [.., T, T] arrays (test is blind)"
    assert square_residuals(ours) == []
