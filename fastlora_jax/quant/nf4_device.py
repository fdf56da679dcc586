"""NF4 quantization in jnp, on whatever device holds the weights (the layout of `nf4.py`).

`quantize_nf4_on_device(w)` returns the same `QTensor` layout as the host quantizer
`quantize_nf4`, the same 4-bit codes (the same float32 comparisons against the NF4 midpoints) and
the same double-quantization path (the 65536-point grid and lookup table of bitsandbytes' CPU
8-bit quantizer). Two differences, both in the last bit of float32 arithmetic: the nested offset
is XLA's float32 mean of the absmax, not a replay of torch's CPU summation order, and the grid
index is computed with two roundings instead of one; so a small fraction of the absmax bytes may
differ by one dynamic-map entry from bitsandbytes'. Use it where speed matters more than
byte-identity with bitsandbytes: quantizing a model created or loaded on the GPU, where the host
numpy quantizer would dominate the start-up; use `quantize_nf4` to reproduce bitsandbytes' files.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fastlora_jax.errors import KernelError
from fastlora_jax.quant.maps import NF4_BOUNDS
from fastlora_jax.quant.nf4 import _DYNAMIC_LUT, _LUT_SIZE, BLOCKSIZE, NESTED_BLOCKSIZE
from fastlora_jax.quant.qtensor import QTensor, QuantKind


def _lut_index(normed: jax.Array) -> jax.Array:
    """float32 in [-1, 1] -> index on bitsandbytes' 65536-point grid: trunc((x+1)/2 * 65535 + 0.5).

    In float32 with two roundings (the host version and bitsandbytes round once, after a fused
    multiply-add), so a value within a float32 ulp of a grid midpoint may land one grid point over.
    """
    t = (jnp.clip(normed, -1.0, 1.0) + 1.0) * 0.5
    return (t * float(_LUT_SIZE - 1) + 0.5).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _quantize(w: jax.Array, dtype: str) -> QTensor:
    *lead, n, k = w.shape
    nb = n * k // BLOCKSIZE
    x = w.astype(jnp.float32).reshape(*lead, nb, BLOCKSIZE)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    # bitsandbytes clamps the absmax at 1e-38 before 1/absmax; XLA flushes that denormal to zero,
    # so an all-zero block is special-cased to scale 0 (its codes become 7, NF4's 0.0, as there).
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(x * inv[..., None], -1.0, 1.0)
    q = jnp.zeros(scaled.shape, jnp.uint8)
    for bound in NF4_BOUNDS:
        q = q + (scaled > bound).astype(jnp.uint8)
    pairs = q.reshape(*lead, nb * BLOCKSIZE // 2, 2)
    codes = (pairs[..., 0] << 4) | pairs[..., 1]

    offset = jnp.mean(absmax, axis=-1)
    d = absmax - offset[..., None]
    nb2 = -(-nb // NESTED_BLOCKSIZE)
    pad = [(0, 0)] * len(lead) + [(0, nb2 * NESTED_BLOCKSIZE - nb)]
    blocks = jnp.pad(d, pad).reshape(*lead, nb2, NESTED_BLOCKSIZE)
    nested = jnp.max(jnp.abs(blocks), axis=-1)
    normed = (blocks * (1.0 / nested)[..., None]).reshape(*lead, nb2 * NESTED_BLOCKSIZE)[..., :nb]
    normed = jnp.where(jnp.isnan(normed), -1.0, normed)
    qabsmax = jnp.take(jnp.asarray(_DYNAMIC_LUT), _lut_index(normed), axis=0)
    zero_block = jnp.repeat(nested == 0, NESTED_BLOCKSIZE, axis=-1)[..., :nb]
    qabsmax = jnp.where(zero_block, jnp.uint8(0), qabsmax)
    return QTensor(codes=codes, absmax=qabsmax, nested_absmax=nested, nested_offset=offset,
                   shape=(n, k), dtype=dtype, kind=QuantKind.NF4, blocksize=BLOCKSIZE,
                   nested_blocksize=NESTED_BLOCKSIZE)


def quantize_nf4_on_device(w: jax.Array, *, dtype: str | None = None) -> QTensor:
    """NF4-quantize w [*lead, N, K] (a jax array; N*K a multiple of 64) where it lives.

    Each [N, K] matrix gets its own double quantization, as in `quantize_nf4`. `dtype` is what
    `dequantize` returns (default: w's dtype: bfloat16, float16 or float32).
    """
    if w.ndim < 2:
        raise KernelError(f"quantize_nf4_on_device: w.shape={w.shape} must be [*lead, N, K] "
                          f"with ndim >= 2")
    n, k = w.shape[-2:]
    if (n * k) % BLOCKSIZE:
        raise KernelError(f"quantize_nf4_on_device: N*K = {n}*{k} must be a multiple of "
                          f"{BLOCKSIZE}; use quantize_nf4 (host) for other shapes")
    name = jnp.dtype(dtype if dtype is not None else w.dtype).name
    if name not in ("bfloat16", "float16", "float32"):
        raise KernelError(f"quantize_nf4_on_device: dtype={name!r} is not supported; expected "
                          f"one of 'bfloat16', 'float16', 'float32'")
    return _quantize(w, name)
