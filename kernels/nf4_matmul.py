"""Fused NF4 dequantize-matmul: y = x @ dequantize(w).T with w an NF4 QTensor of shape [N, K].

x [M, K] (bf16), y [M, N] in x's dtype, float32 accumulation. The weight is never materialized:
each program loads packed codes [block_n, block_k/2] (uint8, element 2i in the high nibble) and
turns each byte into two scaled bf16 weights with the prmt lookup of `nf4_matmul_lut.py` (inline
PTX on GPU, a jnp select tree when interpreted). The high-nibble plane multiplies x's even
columns and the low-nibble plane its odd columns (x is split by XLA), so nothing is interleaved
in-kernel. The backward computes dx = dy @ dequantize(w) with the same decode (no gradient for
w: it is frozen), writing dx's even and odd columns as two outputs that XLA interleaves.

The per-block absmax is decoded (double quantization: dynamic-map lookup, nested scale, offset)
by XLA inside the same jit into float32 [N, K/64] before the launch: that read/write is 1/16 B
per weight, small next to the 1/2 B of codes, and keeps the 256-entry lookup out of the kernel.

Pallas on the Triton backend on GPU (portable: Ampere and later), interpreted on CPU. Shapes: K
must be a multiple of 64 (the quantization block); M and N are padded to the tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_matmul_common import (MatmulTuning, check_dy, check_x,
                                                    default_interpret, pad_axis, zero_cotangent)
from fastlora_jax.kernels.nf4_matmul_decode import DECODE_MAX_M, decode_forward
from fastlora_jax.kernels.nf4_matmul_lut import nf4_pairs, pairs_to_bf16, scale_pairs
from fastlora_jax.kernels.nf4_matmul_mgpu import MgpuTuning, nf4_matmul_mgpu
from fastlora_jax.quant import QTensor, QuantKind, dequantize, nf4_block_scales

# Best of the H200 sweep at M = 2048 / 8192 (2026-11-29) on 7 of 8 shapes.
TRAIN_TUNING = MatmulTuning(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3)
# Backward tiles: block_m rows of dy, block_k output columns, block_n weight rows per step.
BWD_TUNING = MatmulTuning(block_m=128, block_n=64, block_k=128, num_warps=8, num_stages=3)
# M <= DECODE_MAX_M (64) runs the small-M variant in nf4_matmul_decode.py.


def nf4_matmul_reference(x: jax.Array, w: QTensor) -> jax.Array:
    """x [M, K] @ dequantize(w).T -> [M, N] in x.dtype; float32 accumulation."""
    wd = dequantize(w, x.dtype)
    return jnp.dot(x, wd.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _planes(codes: jax.Array, spairs: jax.Array, use_asm: bool) -> tuple[jax.Array, jax.Array]:
    """codes uint8 [r, c] + scale pairs u32 [r, c // 32] -> scaled (hi, lo) bf16 planes [r, c]."""
    r, c = codes.shape
    nb = spairs.shape[1]
    s = jnp.broadcast_to(spairs[:, :, None], (r, nb, 32)).reshape(r, c)
    return pairs_to_bf16(nf4_pairs(codes, s, use_asm))


def _fwd_kernel(xe_ref, xo_ref, c_ref, s_ref, o_ref, *, k: int, block_k: int, use_asm: bool):
    """xe/xo [bm, K/2], codes [bn, K/2], scale pairs [bn, K/64] -> o [bm, bn]."""
    bm, bn = o_ref.shape
    half = block_k // 2
    dims = (((1,), (1,)), ((), ()))

    def step(t, acc):
        k0 = pl.multiple_of(t * half, half)
        hi, lo = _planes(c_ref[:, pl.ds(k0, half)],
                         s_ref[:, pl.ds(t * (block_k // 64), block_k // 64)], use_asm)
        acc = acc + jax.lax.dot_general(xe_ref[:, pl.ds(k0, half)], hi, dims,
                                        preferred_element_type=jnp.float32)
        return acc + jax.lax.dot_general(xo_ref[:, pl.ds(k0, half)], lo, dims,
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_kernel(dy_ref, c_ref, s_ref, oe_ref, oo_ref, *, n: int, block_n: int, use_asm: bool):
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


def _forward(x: jax.Array, w: QTensor, tuning: MatmulTuning | MgpuTuning | None,
             interpret: bool) -> jax.Array:
    m, k = x.shape
    n = w.shape[0]
    codes, scales = nf4_operands(w)
    if isinstance(tuning, MgpuTuning):
        return nf4_matmul_mgpu(x, codes, scales, n, tuning, interpret=interpret)
    if m <= DECODE_MAX_M:
        return decode_forward(x, codes, scales, n, tuning, interpret)
    tuning = tuning or TRAIN_TUNING
    bm = min(tuning.block_m, max(16, pl.next_power_of_2(m)))
    bn, bk = tuning.block_n, tuning.k_step(k)
    xp = pad_axis(x, 0, bm)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    codes, spairs = pad_axis(codes, 0, bn), pad_axis(scale_pairs(scales), 0, bn)
    mp, np_ = xp.shape[0], codes.shape[0]
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, k=k, block_k=bk, use_asm=not interpret),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, k // 2), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, k // 64), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
        interpret=interpret,
        name="nf4_matmul_fwd",
    )(xe, xo, codes, spairs)
    return out[:m, :n]


def _backward(dy: jax.Array, w: QTensor, tuning: MatmulTuning, interpret: bool) -> jax.Array:
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
        functools.partial(_bwd_kernel, n=np_, block_n=bn, use_asm=not interpret),
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _nf4_matmul(x: jax.Array, w: QTensor, tuning: MatmulTuning | MgpuTuning | None,
                bwd_tuning: MatmulTuning | None, bwd_xla: bool, interpret: bool) -> jax.Array:
    return _forward(x, w, tuning, interpret)


def _nf4_matmul_fwd(x, w, tuning, bwd_tuning, bwd_xla, interpret):
    return _forward(x, w, tuning, interpret), w


def _nf4_matmul_bwd(tuning, bwd_tuning, bwd_xla, interpret, w, dy):
    if bwd_xla:
        dx = jnp.dot(dy, dequantize(w, dy.dtype), preferred_element_type=jnp.float32)
        return dx.astype(dy.dtype), zero_cotangent(w)
    return _backward(dy, w, bwd_tuning or BWD_TUNING, interpret), zero_cotangent(w)


_nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


def nf4_matmul(x: jax.Array, w: QTensor, *, tuning: MatmulTuning | MgpuTuning | None = None,
               bwd_tuning: MatmulTuning | None = None, bwd_xla: bool = False,
               interpret: bool | None = None) -> jax.Array:
    """Fused y = x [M, K] @ dequantize(w [N, K]).T -> [M, N] in x.dtype; differentiable in x.

    M <= DECODE_MAX_M runs the small-M (decode) kernels, larger M the tiled kernel (Triton
    backend); a `MgpuTuning` runs the Hopper Mosaic GPU forward (`nf4_matmul_mgpu.py`, sm_90)
    instead, at any M. `tuning` defaults per path. The backward is the fused dx kernel, or XLA's
    dequantize-then-dot when `bwd_xla` (ops.linear picks whichever measured faster).
    `interpret` defaults to True off GPU.
    """
    check_x(x, w, "nf4_matmul")
    if interpret is None:
        interpret = default_interpret()
    return _nf4_matmul(x, w, tuning, bwd_tuning, bwd_xla, interpret)


def nf4_matmul_dx(dy: jax.Array, w: QTensor, *, tuning: MatmulTuning | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """The backward alone: dx = dy [M, N] @ dequantize(w [N, K]) -> [M, K] in dy.dtype."""
    check_dy(dy, w, "nf4_matmul_dx")
    if interpret is None:
        interpret = default_interpret()
    return _backward(dy, w, tuning or BWD_TUNING, interpret)
