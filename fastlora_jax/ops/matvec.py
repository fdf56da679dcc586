"""x @ W.T for a few rows x and a quantized W, with the dequantization inside XLA's reduction.

XLA's CPU dot does not fuse its operands, so dequantize-then-dot writes a dense float copy of
each weight matrix and reads it back — more bytes per decoded token than the float weights
themselves. Written as a multiply-and-reduce, XLA emits one loop that decodes each weight
element where it is used: the packed codes are the only weight bytes read and no dense buffer
exists. Each output row decodes the weights again, so this pays only for a few rows (decode at
small batch); `linear` makes it the CPU default there (`matvec_is_default`).

NF4 needs every 64-element block inside one weight row (K % blocksize == 0, true of every
decoder projection we know); other shapes take dequantize-then-dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.quant import QTensor, QuantKind
from fastlora_jax.quant.maps import NF4_MAP
from fastlora_jax.quant.qtensor import nf4_block_scales

# Rows up to which the fused form is the CPU default, per kind (benchmarks/generate.py's matvec
# rows: it re-decodes the weights per row, so NF4's table lookups stop paying sooner).
MATVEC_DEFAULT_MAX_M = {QuantKind.NF4: 2, QuantKind.INT8: 8}


def matvec_applies(w: QTensor) -> bool:
    return w.kind is QuantKind.INT8 or (w.kind is QuantKind.NF4 and w.shape[1] % w.blocksize == 0)


def matvec_is_default(m: int, w: QTensor) -> bool:
    """Whether the CPU default for x [m, K] @ w.T is `quantized_matvec`."""
    return m <= MATVEC_DEFAULT_MAX_M[w.kind] and matvec_applies(w)


def nf4_values(nibbles: jax.Array) -> jax.Array:
    """NF4_MAP[nibbles] (float32) as a tree of 15 selects on the nibble's bits. A table gather
    would not fuse into the reduction: XLA computes it apart (and hoists it out of the decode
    loop as a dense copy of the weights); selects fuse and vectorise."""
    level = [float(v) for v in NF4_MAP]
    for bit in range(4):
        on = (nibbles & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def quantized_matvec(x: jax.Array, w: QTensor) -> jax.Array:
    """x [M, K] @ dequantize(w).T -> [M, N] in x's dtype (float32 products and sums)."""
    n, k = w.shape
    # The barrier ties the codes to x: without it XLA sees the decoding as loop-invariant and
    # hoists it out of the decode loop, i.e. writes the dense weights once and reads those.
    codes, x = jax.lax.optimization_barrier((jnp.asarray(w.codes), x))
    xf = x.astype(jnp.float32)
    if w.kind is QuantKind.INT8:
        codes = codes.astype(jnp.float32)                                     # [N, K]
        y = jnp.sum(xf[:, None, :] * codes[None], axis=-1)                    # [M, N]
        return (y * jnp.asarray(w.scale, jnp.float32)[None]).astype(x.dtype)
    blocks, half = k // w.blocksize, w.blocksize // 2
    codes = codes.reshape(n, blocks, half)                                    # [N, Kb, 32] u8
    # element 2i of a block is the high nibble of byte i, 2i+1 the low one
    hi, lo = nf4_values(codes >> 4), nf4_values(codes & 0xF)
    xb = xf.reshape(x.shape[0], 1, blocks, half, 2)                           # [M, 1, Kb, 32, 2]
    partial = jnp.sum(xb[..., 0] * hi[None] + xb[..., 1] * lo[None], axis=-1)  # [M, N, Kb]
    scales = nf4_block_scales(w).reshape(n, blocks)                           # [N, Kb]
    return jnp.sum(partial * scales[None], axis=-1).astype(x.dtype)
