"""Fused weight-only int8 matmul: y = x @ dequantize(w).T, w an INT8 QTensor [N, K] (per-row scale).

x [M, K] (bf16) -> y [M, N] in x's dtype, float32 accumulation. Codes are converted to x's dtype
in-kernel (exact for |c| <= 127) and the per-output-channel scale is applied to the float32
accumulator: y = (x @ codes.T) * scale. The backward computes dx = (dy * scale) @ codes with the
same kernel shape (no gradient for w). Pallas, Triton backend on GPU, interpreted on CPU; a
`MgpuTuning` runs the Hopper Mosaic GPU forward instead (`int8_matmul_mgpu.py`, K % 64 == 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.int8_matmul_mgpu import int8_matmul_mgpu
from fastlora_jax.kernels.nf4_matmul_common import (MatmulTuning, check_dy, check_x,
                                                    default_interpret, pad_axis, zero_cotangent)
from fastlora_jax.kernels.weight_stream_mgpu import MgpuTuning
from fastlora_jax.quant import QTensor, QuantKind, dequantize

TRAIN_TUNING = MatmulTuning(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
# Best of the H200 sweep at M = 1, 16 and 64 (benchmarks/RESULTS.md, 2026-11-28).
DECODE_TUNING = MatmulTuning(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3)
BWD_TUNING = MatmulTuning(block_m=128, block_n=64, block_k=128, num_warps=8, num_stages=3)
DECODE_MAX_M = 64


def int8_matmul_reference(x: jax.Array, w: QTensor) -> jax.Array:
    """x [M, K] @ dequantize(w).T -> [M, N] in x.dtype; float32 accumulation."""
    wd = dequantize(w, x.dtype)
    return jnp.dot(x, wd.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _fwd_kernel(x_ref, c_ref, s_ref, o_ref, *, k: int, block_k: int):
    """x [bm, K], codes [bn, K], scale [1, bn] -> o [bm, bn]."""
    bm, bn = o_ref.shape

    def step(t, acc):
        k0 = pl.multiple_of(t * block_k, block_k)
        wt = c_ref[:, pl.ds(k0, block_k)].astype(x_ref.dtype)    # [bn, bk]
        xt = x_ref[:, pl.ds(k0, block_k)]                          # [bm, bk]
        return acc + jax.lax.dot_general(xt, wt, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...]).astype(o_ref.dtype)


def _bwd_kernel(dy_ref, c_ref, s_ref, o_ref, *, n: int, block_n: int):
    """dy [bm, N], codes [N, bk], scale [1, N] -> dx [bm, bk]."""
    bm, bk = o_ref.shape

    def step(t, acc):
        n0 = pl.multiple_of(t * block_n, block_n)
        scale = s_ref[:, pl.ds(n0, block_n)]                       # [1, bn]
        dyt = (dy_ref[:, pl.ds(n0, block_n)].astype(jnp.float32) * scale).astype(dy_ref.dtype)
        wt = c_ref[pl.ds(n0, block_n), :].astype(dy_ref.dtype)    # [bn, bk]
        return acc + jnp.dot(dyt, wt, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n // block_n, step, jnp.zeros((bm, bk), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _operands(w: QTensor) -> tuple[jax.Array, jax.Array]:
    if w.kind is not QuantKind.INT8:
        raise KernelError(f"int8_matmul: w.kind={w.kind.value}, expected int8")
    return jnp.asarray(w.codes), jnp.asarray(w.scale, jnp.float32).reshape(1, -1)


def _forward(x: jax.Array, w: QTensor, tuning: MatmulTuning | MgpuTuning,
             interpret: bool) -> jax.Array:
    m, k = x.shape
    n = w.shape[0]
    codes, scale = _operands(w)
    if isinstance(tuning, MgpuTuning):
        return int8_matmul_mgpu(x, codes, scale.reshape(-1), n, tuning, interpret=interpret)
    bm = min(tuning.block_m, max(16, pl.next_power_of_2(m)))
    bn, bk = tuning.block_n, tuning.k_step(k, quantum=16)
    xp = pad_axis(x, 0, bm)
    codes, scale = pad_axis(codes, 0, bn), pad_axis(scale, 1, bn)
    mp, np_ = xp.shape[0], codes.shape[0]
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, k=k, block_k=bk),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, k), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
        interpret=interpret,
        name="int8_matmul_fwd",
    )(xp, codes, scale)
    return out[:m, :n]


def _backward(dy: jax.Array, w: QTensor, tuning: MatmulTuning, interpret: bool) -> jax.Array:
    m, n = dy.shape
    k = w.shape[1]
    codes, scale = _operands(w)
    bm = min(tuning.block_m, max(16, pl.next_power_of_2(m)))
    bn, bk = tuning.block_n, tuning.k_step(k, quantum=16)
    dyp = pad_axis(pad_axis(dy, 0, bm), 1, bn)
    codes, scale = pad_axis(codes, 0, bn), pad_axis(scale, 1, bn)
    mp, np_ = dyp.shape
    out = pl.pallas_call(
        functools.partial(_bwd_kernel, n=np_, block_n=bn),
        out_shape=jax.ShapeDtypeStruct((mp, k), dy.dtype),
        grid=(mp // bm, k // bk),
        in_specs=[pl.BlockSpec((bm, np_), lambda i, j: (i, 0)),
                  pl.BlockSpec((np_, bk), lambda i, j: (0, j)),
                  pl.BlockSpec((1, np_), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
        interpret=interpret,
        name="int8_matmul_bwd",
    )(dyp, codes, scale)
    return out[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _int8_matmul(x: jax.Array, w: QTensor, tuning: MatmulTuning | MgpuTuning,
                 bwd_tuning: MatmulTuning,
                 bwd_xla: bool, interpret: bool) -> jax.Array:
    return _forward(x, w, tuning, interpret)


def _int8_matmul_fwd(x, w, tuning, bwd_tuning, bwd_xla, interpret):
    return _forward(x, w, tuning, interpret), w


def _int8_matmul_bwd(tuning, bwd_tuning, bwd_xla, interpret, w, dy):
    if bwd_xla:
        dx = jnp.dot(dy, dequantize(w, dy.dtype), preferred_element_type=jnp.float32)
        return dx.astype(dy.dtype), zero_cotangent(w)
    return _backward(dy, w, bwd_tuning, interpret), zero_cotangent(w)


_int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)


def int8_matmul(x: jax.Array, w: QTensor, *, tuning: MatmulTuning | MgpuTuning | None = None,
                bwd_tuning: MatmulTuning | None = None, bwd_xla: bool = False,
                interpret: bool | None = None) -> jax.Array:
    """Fused y = x [M, K] @ dequantize(w [N, K]).T -> [M, N] in x.dtype; differentiable in x.

    K must be a multiple of 16. `tuning` defaults to DECODE_TUNING for M <= DECODE_MAX_M; a
    `MgpuTuning` runs the Hopper Mosaic GPU forward (sm_90, bf16 x, K % 64 == 0). The
    backward is the fused dx kernel, or XLA's dequantize-then-dot when `bwd_xla`.
    """
    check_x(x, w, "int8_matmul")
    if tuning is None:
        tuning = DECODE_TUNING if x.shape[0] <= DECODE_MAX_M else TRAIN_TUNING
    if interpret is None:
        interpret = default_interpret()
    return _int8_matmul(x, w, tuning, bwd_tuning or BWD_TUNING, bwd_xla, interpret)


def int8_matmul_dx(dy: jax.Array, w: QTensor, *, tuning: MatmulTuning | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """The backward alone: dx = dy [M, N] @ dequantize(w [N, K]) -> [M, K] in dy.dtype."""
    check_dy(dy, w, "int8_matmul_dx")
    if interpret is None:
        interpret = default_interpret()
    return _backward(dy, w, tuning or BWD_TUNING, interpret)
