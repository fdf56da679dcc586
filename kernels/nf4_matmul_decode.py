"""Small-M (decode) variant of the fused NF4 matmul: bandwidth-bound, no nibble interleaving.

y = x @ dequantize(w).T for x [M, K] with M <= 64. The weight's even columns live in the high
nibbles and its odd columns in the low nibbles, so x is split once (by XLA, cheap at small M) into
x_even, x_odd [M, K/2] and each nibble plane is multiplied against its half: no in-kernel
join/reshape (layout shuffles). Every loop step handles `block_k / 64` quantization blocks of 32
bytes per weight row, each with one float32 absmax per row broadcast along the block.

- M == 1: FMA variant on CUDA cores, a [block_n, 32] float32 accumulator reduced at the end.
- 1 < M <= 64: tensor-core variant, M padded to a power of two >= 16 (`block_m` is ignored).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.kernels.nf4_matmul_common import MatmulTuning, pad_axis

# Best of the H200 sweeps (benchmarks/RESULTS.md, 2026-11-28): M = 1, M <= 16, 16 < M <= 64.
DECODE_FMA_TUNING = MatmulTuning(block_m=16, block_n=64, block_k=256, num_warps=8, num_stages=3)
DECODE_MMA16_TUNING = MatmulTuning(block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=3)
DECODE_MMA_TUNING = MatmulTuning(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
DECODE_MAX_M = 64


def _planes(codes: jax.Array, lookup) -> tuple[jax.Array, jax.Array]:
    q = codes.astype(jnp.int32)
    return lookup(q >> 4), lookup(q & 0xF)


def _fma_kernel(xe_ref, xo_ref, c_ref, s_ref, o_ref, *, k: int, sub: int, lookup):
    """xe/xo [1, K/2], codes [bn, K/2], scales [bn, K/64] -> o [1, bn]."""
    bn = c_ref.shape[0]

    def step(t, acc):
        for u in range(sub):
            b = t * sub + u
            off = pl.multiple_of(b * 32, 32)
            hi, lo = _planes(c_ref[:, pl.ds(off, 32)], lookup)             # [bn, 32] f32
            xe = xe_ref[:, pl.ds(off, 32)].astype(jnp.float32)              # [1, 32]
            xo = xo_ref[:, pl.ds(off, 32)].astype(jnp.float32)
            acc = acc + (hi * xe + lo * xo) * s_ref[:, pl.ds(b, 1)]
        return acc

    acc = jax.lax.fori_loop(0, k // (64 * sub), step, jnp.zeros((bn, 32), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=1)[None, :].astype(o_ref.dtype)


def _mma_kernel(xe_ref, xo_ref, c_ref, s_ref, o_ref, *, k: int, sub: int, lookup):
    """xe/xo [bm, K/2], codes [bn, K/2], scales [bn, K/64] -> o [bm, bn]."""
    bm, bn = o_ref.shape
    dims = (((1,), (1,)), ((), ()))

    def step(t, acc):
        for u in range(sub):
            b = t * sub + u
            off = pl.multiple_of(b * 32, 32)
            hi, lo = _planes(c_ref[:, pl.ds(off, 32)], lookup)
            s = s_ref[:, pl.ds(b, 1)]
            hi, lo = (hi * s).astype(xe_ref.dtype), (lo * s).astype(xe_ref.dtype)
            acc = acc + jax.lax.dot_general(xe_ref[:, pl.ds(off, 32)], hi, dims,
                                            preferred_element_type=jnp.float32)
            acc = acc + jax.lax.dot_general(xo_ref[:, pl.ds(off, 32)], lo, dims,
                                            preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, k // (64 * sub), step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def decode_forward(x: jax.Array, codes: jax.Array, scales: jax.Array, n: int,
                   tuning: MatmulTuning | None, interpret: bool, lookup) -> jax.Array:
    """x [M, K] (M <= 64), codes uint8 [N, K/2], scales f32 [N, K/64] -> y [M, N] in x.dtype."""
    m, k = x.shape
    fma = m == 1
    if tuning is None:
        tuning = (DECODE_FMA_TUNING if fma else
                  DECODE_MMA16_TUNING if m <= 16 else DECODE_MMA_TUNING)
    bm = 1 if fma else max(16, pl.next_power_of_2(m))
    bn, bk = tuning.block_n, tuning.k_step(k)
    xp = pad_axis(x, 0, bm)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    codes, scales = pad_axis(codes, 0, bn), pad_axis(scales, 0, bn)
    np_ = codes.shape[0]
    kernel = _fma_kernel if fma else _mma_kernel
    out = pl.pallas_call(
        functools.partial(kernel, k=k, sub=bk // 64, lookup=lookup),
        out_shape=jax.ShapeDtypeStruct((bm, np_), x.dtype),
        grid=(np_ // bn,),
        in_specs=[pl.BlockSpec((bm, k // 2), lambda j: (0, 0)),
                  pl.BlockSpec((bm, k // 2), lambda j: (0, 0)),
                  pl.BlockSpec((bn, k // 2), lambda j: (j, 0)),
                  pl.BlockSpec((bn, k // 64), lambda j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda j: (0, j)),
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
        interpret=interpret,
        name="nf4_matmul_decode_fma" if fma else "nf4_matmul_decode_mma",
    )(xe, xo, codes, scales)
    return out[:m, :n]
