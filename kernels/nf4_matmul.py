"""Fused NF4 dequantize-matmul on the Triton backend: the decode forward (M <= 64), the dx kernel.

y = x @ dequantize(w).T for x [M, K] (bf16) and an NF4 QTensor w [N, K] (blocks of 64 weights,
K a multiple of 64), y in x's dtype with float32 accumulation; dx = dy @ dequantize(w) for the
backward (w is frozen: no gradient). The weight is never materialized: programs load packed
codes (uint8, element 2i in the high nibble) and turn each byte into two weights with the prmt
lookup of `nf4_lookup.py` (inline PTX on GPU, a jnp select tree when interpreted).

Forward. The weight's even columns live in the high nibbles and its odd columns in the low ones,
so x is split once (by XLA, cheap at small M) into x_even, x_odd [M, K/2] and each nibble plane
is multiplied against its half: no in-kernel interleaving. Each loop step handles block_k / 64
quantization blocks of 32 code bytes per weight row.
- M == 1: CUDA cores, a [block_n, 32] float32 accumulator; the block's absmax multiplies the
  per-block products in float32.
- 1 < M <= 64: tensor cores, M padded to a power of two >= 16; the absmax is folded into the
  bf16 weights by the lookup (bf16x2 FMA).
- split-K: the grid is (N / block_n, splits); each program reduces K / splits and writes float32
  partials [splits, M, N] that XLA sums, so a small N still keeps every SM streaming.
dx kernel: dx's even and odd columns come out as two outputs that XLA interleaves.

The per-block absmax is decoded (double quantization: dynamic-map lookup, nested scale, offset)
by XLA inside the same jit into float32 [N, K/64] before the launch: that read/write is 1/16 B
per weight, small next to the 1/2 B of codes, and keeps the 256-entry lookup out of the kernel.
Larger M: `nf4_dequant.py` (ops.linear picks; see docs/kernels.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_lookup import nf4_pairs, pairs_to_bf16, pairs_to_f32, scale_pairs
from fastlora_jax.kernels.quant_matmul_common import (TritonMatmulTuning, check_dy, check_x,
                                                      pad_axis, split_k, zero_cotangent)
from fastlora_jax.ops import defaults
from fastlora_jax.ops.impl import interpreted
from fastlora_jax.quant import QTensor, QuantKind, dequantize, nf4_block_scales

MAX_M = defaults.FUSED_MAX_M[QuantKind.NF4]  # rows of x the decode forward takes


def nf4_matmul_reference(x: jax.Array, w: QTensor) -> jax.Array:
    """x [M, K] @ dequantize(w).T -> [M, N] in x.dtype; float32 accumulation."""
    wd = dequantize(w, x.dtype)
    return jnp.dot(x, wd.T, preferred_element_type=jnp.float32).astype(x.dtype)


def nf4_operands(w: QTensor) -> tuple[jax.Array, jax.Array]:
    """codes uint8 [N, K/2] and decoded absmax float32 [N, K/64] of one NF4 matrix."""
    n, k = w.shape
    if w.kind is not QuantKind.NF4 or w.blocksize != 64:
        raise KernelError(f"nf4_matmul: w.kind={w.kind.value}, w.blocksize={w.blocksize}; "
                          f"expected nf4 with blocksize 64")
    if k % 64:
        raise KernelError(f"nf4_matmul: K={k} must be a multiple of 64 (the NF4 block) for the "
                          f"fused kernel; use nf4_matmul_reference for this shape")
    codes = jnp.asarray(w.codes).reshape(n, k // 2)
    scales = nf4_block_scales(w).reshape(n, k // 64)
    return codes, scales


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


def _planes(codes: jax.Array, spairs: jax.Array, use_asm: bool) -> tuple[jax.Array, jax.Array]:
    """codes uint8 [r, c] + scale pairs u32 [r, c // 32] -> scaled (hi, lo) bf16 planes [r, c]."""
    r, c = codes.shape
    nb = spairs.shape[1]
    s = jnp.broadcast_to(spairs[:, :, None], (r, nb, 32)).reshape(r, c)
    return pairs_to_bf16(nf4_pairs(codes, s, use_asm))


def _dx_kernel(dy_ref, c_ref, s_ref, oe_ref, oo_ref, *, n: int, block_n: int, use_asm: bool):
    """dy [bm, N], codes [N, bk/2], scale pairs [N, bk/64] -> dx even / odd columns [bm, bk/2]."""
    bm, half = oe_ref.shape

    def step(t, accs):
        n0 = pl.multiple_of(t * block_n, block_n)
        hi, lo = _planes(c_ref[pl.ds(n0, block_n), :], s_ref[pl.ds(n0, block_n), :], use_asm)
        dyt = dy_ref[:, pl.ds(n0, block_n)]                        # [bm, bn]
        return (accs[0] + jnp.dot(dyt, hi, preferred_element_type=jnp.float32),
                accs[1] + jnp.dot(dyt, lo, preferred_element_type=jnp.float32))

    zero = jnp.zeros((bm, half), jnp.float32)
    acc_e, acc_o = jax.lax.fori_loop(0, n // block_n, step, (zero, zero))
    oe_ref[...] = acc_e.astype(oe_ref.dtype)
    oo_ref[...] = acc_o.astype(oo_ref.dtype)


def nf4_triton_forward(x: jax.Array, w: QTensor, tuning: TritonMatmulTuning,
                       interpret: bool) -> jax.Array:
    """The decode forward alone: x [M, K] (M <= 64) -> y [M, N] in x.dtype."""
    m, k = x.shape
    if m > MAX_M:
        raise KernelError(f"nf4_matmul: M={m} rows of x; the fused NF4 forward takes M <= {MAX_M} "
                          f"(decode). For more rows use ops.linear (it dequantizes with "
                          f"kernels/nf4_dequant.py before the GEMM)")
    n = w.shape[0]
    codes, scales = nf4_operands(w)
    fma = m == 1
    bm = 1 if fma else max(16, pl.next_power_of_2(m))
    bn, bk = tuning.block_n, tuning.k_step(k)
    codes = pad_axis(codes, 0, bn)
    scales = pad_axis(scales, 0, bn)
    np_ = codes.shape[0]
    k_steps = k // bk
    splits = tuning.splits or split_k(np_ // bn, k_steps, defaults.TRITON_SPLIT_PROGRAMS)
    if k_steps % splits:
        raise KernelError(f"nf4_matmul: splits={splits} must divide K / block_k = "
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


def nf4_triton_dx(dy: jax.Array, w: QTensor, tuning: TritonMatmulTuning,
                  interpret: bool) -> jax.Array:
    """The dx kernel alone: dy [M, N] -> dx = dy @ dequantize(w) [M, K] in dy.dtype."""
    m, n = dy.shape
    k = w.shape[1]
    codes, scales = nf4_operands(w)
    bm = min(tuning.block_m, max(16, pl.next_power_of_2(m)))
    bn, bk = tuning.block_n, tuning.k_step(k)
    dyp = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    codes, spairs = pad_axis(codes, 0, bn), pad_axis(scale_pairs(scales), 0, bn)
    mp, np_ = dyp.shape
    half = jax.ShapeDtypeStruct((mp, k // 2), dy.dtype)
    dxe, dxo = pl.pallas_call(
        functools.partial(_dx_kernel, n=np_, block_n=bn, use_asm=not interpret),
        out_shape=[half, half],
        grid=(mp // bm, k // bk),
        in_specs=[pl.BlockSpec((bm, np_), lambda i, j: (i, 0)),
                  pl.BlockSpec((np_, bk // 2), lambda i, j: (0, j)),
                  pl.BlockSpec((np_, bk // 64), lambda i, j: (0, j))],
        out_specs=[pl.BlockSpec((bm, bk // 2), lambda i, j: (i, j))] * 2,
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
        interpret=interpret,
        name="nf4_matmul_bwd",
    )(dyp, codes, spairs)
    # dx[:, 2i] = dxe[:, i], dx[:, 2i + 1] = dxo[:, i]
    return jnp.stack([dxe[:m], dxo[:m]], axis=-1).reshape(m, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def nf4_with_dx_kernel(x: jax.Array, w: QTensor, forward: Callable[[jax.Array, QTensor], jax.Array],
                       dx_tuning: TritonMatmulTuning, interpret: bool) -> jax.Array:
    """forward(x, w), differentiable in x through the dx kernel (w frozen): the custom VJP of
    both NF4 fused forwards (this file's and `nf4_matmul_mgpu.py`'s)."""
    return forward(x, w)


def _nf4_with_dx_kernel_fwd(x, w, forward, dx_tuning, interpret):
    return forward(x, w), w


def _nf4_with_dx_kernel_bwd(forward, dx_tuning, interpret, w, dy):
    return nf4_triton_dx(dy, w, dx_tuning, interpret), zero_cotangent(w)


nf4_with_dx_kernel.defvjp(_nf4_with_dx_kernel_fwd, _nf4_with_dx_kernel_bwd)


def nf4_matmul(x: jax.Array, w: QTensor, *, tuning: TritonMatmulTuning | None = None,
               dx_tuning: TritonMatmulTuning | None = None,
               interpret: bool | None = None) -> jax.Array:
    """Fused y = x [M, K] @ dequantize(w [N, K]).T -> [M, N] in x.dtype for M <= 64, with the
    dx kernel as its backward (differentiable in x; w frozen). Tunings default to the measured
    ones (`TritonMatmulTuning.for_nf4`, `for_nf4_dx`); `interpret` to True off the GPU."""
    check_x(x, w, "nf4_matmul")
    tuning = tuning or TritonMatmulTuning.for_nf4(min(x.shape[0], MAX_M))
    interpret = interpreted() if interpret is None else interpret
    forward = functools.partial(nf4_triton_forward, tuning=tuning, interpret=interpret)
    return nf4_with_dx_kernel(x, w, forward, dx_tuning or TritonMatmulTuning.for_nf4_dx(),
                              interpret)


def nf4_matmul_dx(dy: jax.Array, w: QTensor, *, tuning: TritonMatmulTuning | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """The backward alone: dx = dy [M, N] @ dequantize(w [N, K]) -> [M, K] in dy.dtype."""
    check_dy(dy, w, "nf4_matmul_dx")
    return nf4_triton_dx(dy, w, tuning or TritonMatmulTuning.for_nf4_dx(),
                         interpreted() if interpret is None else interpret)
