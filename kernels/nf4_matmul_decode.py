"""Small-M (decode) variant of the fused NF4 matmul: bandwidth-bound, split-K, no interleaving.

y = x @ dequantize(w).T for x [M, K] with M <= 64. The weight's even columns live in the high
nibbles and its odd columns in the low nibbles, so x is split once (by XLA, cheap at small M) into
x_even, x_odd [M, K/2] and each nibble plane is multiplied against its half: no in-kernel
join/reshape (layout shuffles). Each loop step handles `block_k / 64` quantization blocks of 32
code bytes per weight row; the bytes become bf16 pairs through the prmt lookup
(`nf4_matmul_lut.py`, ~3 instructions per weight on GPU).

- FMA variant (M == 1 by default): CUDA cores, a [block_n, 32] float32 accumulator; the block
  scale multiplies the per-block products in float32.
- MMA variant (1 < M <= 64): tensor cores, M padded to a power of two >= 16; the scale is folded
  into the bf16 weights by the lookup (bf16x2 FMA).
- split-K: the grid is (N / block_n, splits); each program reduces K / splits and writes float32
  partials [splits, M, N] that XLA sums. `splits` defaults to enough programs (>= 2 per SM of an
  H100/H200, 132 SMs) to keep every SM streaming when N is small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_matmul_common import MatmulTuning, pad_axis
from fastlora_jax.kernels.nf4_matmul_lut import nf4_pairs, pairs_to_bf16, pairs_to_f32, scale_pairs

# Defaults per regime: M = 1 (FMA), M <= 16 and 16 < M <= 64 (MMA); best of the H200 sweep
# (2026-11-29, benchmarks/RESULTS.md).
DECODE_FMA_TUNING = MatmulTuning(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3)
DECODE_MMA16_TUNING = MatmulTuning(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3)
DECODE_MMA_TUNING = MatmulTuning(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3)
DECODE_MAX_M = 64
TARGET_PROGRAMS = 264  # 2 per SM on a 132-SM H100/H200


def default_splits(n_tiles: int, k_steps: int) -> int:
    """Power-of-two split of the K loop so that n_tiles * splits reaches TARGET_PROGRAMS."""
    splits = 1
    while n_tiles * splits < TARGET_PROGRAMS and k_steps % (2 * splits) == 0 and splits < 16:
        splits *= 2
    return splits


def _fma_kernel(xe_ref, xo_ref, c_ref, s_ref, o_ref, *, steps: int, sub: int, use_asm: bool):
    """xe/xo [1, Ks/2], codes [bn, Ks/2], scales f32 [bn, Ks/64] -> o [1, bn]."""
    bn = c_ref.shape[0]

    def step(t, acc):
        for u in range(sub):
            b = t * sub + u
            off = pl.multiple_of(b * 32, 32)
            hi, lo = pairs_to_f32(nf4_pairs(c_ref[:, pl.ds(off, 32)], None, use_asm))
            xe = xe_ref[:, pl.ds(off, 32)].astype(jnp.float32)              # [1, 32]
            xo = xo_ref[:, pl.ds(off, 32)].astype(jnp.float32)
            acc = acc + (hi * xe + lo * xo) * s_ref[:, pl.ds(b, 1)]
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bn, 32), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=1)[None, :].astype(o_ref.dtype)


def _mma_kernel(xe_ref, xo_ref, c_ref, s_ref, o_ref, *, steps: int, sub: int, use_asm: bool):
    """xe/xo [bm, Ks/2], codes [bn, Ks/2], scale pairs u32 [bn, Ks/64] -> o [bm, bn]."""
    bm, bn = o_ref.shape
    dims = (((1,), (1,)), ((), ()))

    def step(t, acc):
        for u in range(sub):
            b = t * sub + u
            off = pl.multiple_of(b * 32, 32)
            pairs = nf4_pairs(c_ref[:, pl.ds(off, 32)], s_ref[:, pl.ds(b, 1)], use_asm)
            hi, lo = pairs_to_bf16(pairs)
            acc = acc + jax.lax.dot_general(xe_ref[:, pl.ds(off, 32)], hi, dims,
                                            preferred_element_type=jnp.float32)
            acc = acc + jax.lax.dot_general(xo_ref[:, pl.ds(off, 32)], lo, dims,
                                            preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def decode_forward(x: jax.Array, codes: jax.Array, scales: jax.Array, n: int,
                   tuning: MatmulTuning | None, interpret: bool, *, fma: bool | None = None,
                   splits: int | None = None) -> jax.Array:
    """x [M, K] (M <= 64), codes uint8 [N, K/2], scales f32 [N, K/64] -> y [M, N] in x.dtype.

    `fma` picks the CUDA-core variant (default: M == 1); `splits` the split-K factor (a power
    of two dividing K / block_k; default `default_splits`).
    """
    m, k = x.shape
    if m > DECODE_MAX_M:
        raise KernelError(f"decode_forward: M={m} must be <= {DECODE_MAX_M}; use nf4_matmul")
    fma = m == 1 if fma is None else fma
    if fma and m != 1:
        raise KernelError(f"decode_forward: fma=True needs M == 1, got M={m}")
    if tuning is None:
        tuning = (DECODE_FMA_TUNING if fma else
                  DECODE_MMA16_TUNING if m <= 16 else DECODE_MMA_TUNING)
    bm = 1 if fma else max(16, pl.next_power_of_2(m))
    bn, bk = tuning.block_n, tuning.k_step(k)
    codes = pad_axis(codes, 0, bn)
    scales = pad_axis(scales, 0, bn)
    np_ = codes.shape[0]
    k_steps = k // bk
    splits = default_splits(np_ // bn, k_steps) if splits is None else splits
    if k_steps % splits:
        raise KernelError(f"decode_forward: splits={splits} must divide K / block_k = "
                          f"{k}/{bk} = {k_steps}")
    ks = k // splits
    xp = pad_axis(x, 0, bm)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    if not fma:
        scales = scale_pairs(scales)
    out_dtype = jnp.float32 if splits > 1 else x.dtype
    kernel = _fma_kernel if fma else _mma_kernel
    out = pl.pallas_call(
        functools.partial(kernel, steps=ks // bk, sub=bk // 64, use_asm=not interpret),
        out_shape=jax.ShapeDtypeStruct((splits * bm, np_), out_dtype),
        grid=(np_ // bn, splits),
        in_specs=[pl.BlockSpec((bm, ks // 2), lambda j, s: (0, s)),
                  pl.BlockSpec((bm, ks // 2), lambda j, s: (0, s)),
                  pl.BlockSpec((bn, ks // 2), lambda j, s: (j, s)),
                  pl.BlockSpec((bn, ks // 64), lambda j, s: (j, s))],
        out_specs=pl.BlockSpec((bm, bn), lambda j, s: (s, j)),
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
        interpret=interpret,
        name="nf4_matmul_decode_fma" if fma else "nf4_matmul_decode_mma",
    )(xe, xo, codes, scales)
    if splits > 1:
        out = out.reshape(splits, bm, np_).sum(axis=0).astype(x.dtype)
    return out[:m, :n]
