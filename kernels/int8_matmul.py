"""Fused weight-only int8 matmul: y = x @ dequantize(w).T, w an INT8 QTensor [N, K] (per-row scale).

x [M, K] (bf16) -> y [M, N] in x's dtype, float32 accumulation. Codes are converted to x's dtype
in-kernel (exact for |c| <= 127) and the per-output-channel scale is applied to the float32
accumulator: y = (x @ codes.T) * scale. Pallas on the Triton backend on GPU, interpreted on the
CPU. The backward (dx = dy @ dequantize(w), no gradient for w) is XLA's: a dx kernel of this
shape measured slower than it (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.quant_matmul_common import (TritonMatmulTuning, check_x, pad_axis,
                                                      xla_dx, zero_cotangent)
from fastlora_jax.ops.impl import interpreted
from fastlora_jax.quant import QTensor, QuantKind, dequantize


def int8_matmul_reference(x: jax.Array, w: QTensor) -> jax.Array:
    """x [M, K] @ dequantize(w).T -> [M, N] in x.dtype; float32 accumulation."""
    wd = dequantize(w, x.dtype)
    return jnp.dot(x, wd.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _int8_kernel(x_ref, c_ref, s_ref, o_ref, *, k: int, block_k: int):
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


def int8_triton_forward(x: jax.Array, w: QTensor, tuning: TritonMatmulTuning,
                        interpret: bool) -> jax.Array:
    """The forward alone: x [M, K] -> y [M, N] in x.dtype (K % 16 == 0)."""
    if w.kind is not QuantKind.INT8:
        raise KernelError(f"int8_matmul: w.kind={w.kind.value}, expected int8")
    m, k = x.shape
    n = w.shape[0]
    codes, scale = jnp.asarray(w.codes), jnp.asarray(w.scale, jnp.float32).reshape(1, -1)
    bm = min(tuning.block_m, max(16, pl.next_power_of_2(m)))
    bn, bk = tuning.block_n, tuning.k_step(k, quantum=16)
    xp = pad_axis(x, 0, bm)
    codes, scale = pad_axis(codes, 0, bn), pad_axis(scale, 1, bn)
    mp, np_ = xp.shape[0], codes.shape[0]
    out = pl.pallas_call(
        functools.partial(_int8_kernel, k=k, block_k=bk),
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _int8_matmul(x: jax.Array, w: QTensor, tuning: TritonMatmulTuning,
                 interpret: bool) -> jax.Array:
    return int8_triton_forward(x, w, tuning, interpret)


def _int8_matmul_fwd(x, w, tuning, interpret):
    return int8_triton_forward(x, w, tuning, interpret), w


def _int8_matmul_bwd(tuning, interpret, w, dy):
    return xla_dx(dy, w), zero_cotangent(w)


_int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)


def int8_matmul(x: jax.Array, w: QTensor, *, tuning: TritonMatmulTuning | None = None,
                interpret: bool | None = None) -> jax.Array:
    """Fused y = x [M, K] @ dequantize(w [N, K]).T -> [M, N] in x.dtype; differentiable in x
    (dx by XLA's dequantize-then-dot). K must be a multiple of 16. `tuning` defaults to
    `TritonMatmulTuning.for_int8(M)`; `interpret` to True off the GPU."""
    check_x(x, w, "int8_matmul")
    tuning = tuning or TritonMatmulTuning.for_int8(x.shape[0])
    return _int8_matmul(x, w, tuning, interpreted() if interpret is None else interpret)
