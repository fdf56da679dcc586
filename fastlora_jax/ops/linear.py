"""Frozen-weight linear dispatch: y = x @ W.T (+ b), W in HF layout [out, in].

The model calls `linear(x, w)` for every frozen projection; `w` is a plain array here. Quantized
weights (`QTensor`) are dispatched to the fused kernels or to dequantize-then-dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.ops.impl import Impl


def linear(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
           impl: Impl | str | None = None) -> jax.Array:
    """x [..., in] @ w[out, in].T -> [..., out] in x's dtype (float32 accumulation)."""
    del impl  # plain arrays always go through XLA's dot
    w = w.astype(x.dtype)
    y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y
