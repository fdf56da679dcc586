"""Frozen-weight linear dispatch: y = x @ W.T (+ b), W in HF layout [out, in].

The model calls `linear(x, w)` for every frozen projection. `w` is a plain array (XLA's dot) or a
`QTensor` (NF4 / int8). For a QTensor, `impl` picks the implementation (None: the measured
default for this platform and shape, `defaults.linear_impl`):
- XLA: dequantize-then-dot under the caller's jit (XLA fuses the dequantization into one
  elementwise pass over the weight before the GEMM), forward and dx. Its backward keeps only the
  quantized weight and dequantizes it again (`_dequant_dot`): autodiff of the plain form would
  keep each layer's dense weight alive from the forward to the backward, N*K*2 bytes per
  projection per layer (about 14 GB for Llama-3-8B in bf16 without remat), which is more than
  the NF4 weights themselves.
- REFERENCE: the same dequantize-then-dot differentiated by JAX (dense weight as its residual).
- PALLAS_TRITON: our kernels. M <= 64 rows: the fused dequantize-matmul forward
  (`kernels/nf4_matmul.py`, `kernels/int8_matmul.py`), whose dx is NF4's dx kernel or, for
  int8, XLA's dequantize-then-dot. More rows, NF4 with bf16 / fp16 x: our dequantization kernel
  (`kernels/nf4_dequant.py`) before XLA's GEMM, forward and dx. int8 at any M: its fused forward.
  Shapes no kernel takes (NF4 with K % 64 != 0 and float32 x, int8 with K % 16 != 0) run XLA.
- PALLAS_MOSAIC: as PALLAS_TRITON, but NF4 with bf16 x and M <= 64 runs the Hopper Mosaic GPU
  forward (`kernels/nf4_matmul_mgpu.py`).
On the CPU the default for a few rows (decode) is `ops/matvec.py`'s fused multiply-and-reduce
form of the XLA path, which never writes a dense copy of the weight.
Pallas kernels run interpreted off the GPU. docs/kernels.md has the whole table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.errors import KernelError
from fastlora_jax.ops import defaults, partition
from fastlora_jax.ops.impl import Impl, as_impl, check_mosaic_device, is_hopper, on_gpu
from fastlora_jax.quant import QTensor, QuantKind, dequantize, untile
from fastlora_jax.ops.matvec import matvec_is_default, quantized_matvec


@jax.custom_vjp
def _dequant_dot(x: jax.Array, w: QTensor) -> jax.Array:
    """x [M, K] @ dequantize(w).T in x's dtype; differentiable in x only (w is frozen)."""
    return jnp.dot(x, dequantize(w, x.dtype).T)


def _dequant_dot_fwd(x: jax.Array, w: QTensor) -> tuple[jax.Array, QTensor]:
    # Residual: the quantized weight only (the module docstring says why).
    return _dequant_dot(x, w), w


def _dequant_dot_bwd(w: QTensor, dy: jax.Array) -> tuple[jax.Array, QTensor]:
    from fastlora_jax.kernels.quant_matmul_common import zero_cotangent

    return jnp.dot(dy, dequantize(w, dy.dtype)), zero_cotangent(w)


_dequant_dot.defvjp(_dequant_dot_fwd, _dequant_dot_bwd)


def _quantized_linear(x: jax.Array, w: QTensor, impl: Impl | None) -> jax.Array:
    w = untile(w)
    if w.lead:
        raise KernelError(f"linear: w has leading axes {w.lead}; slice the layer (w[i]) first")
    k = w.shape[1]
    if x.shape[-1] != k:
        raise KernelError(f"linear: x.shape={x.shape} must end in K = w.shape[1] = {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    default = impl is None
    if impl is None:
        impl = defaults.linear_impl(w.kind, w.blocksize, m, k, x.dtype, gpu=on_gpu(),
                                    hopper=is_hopper())
    if impl is Impl.CUDNN:
        raise KernelError("linear: impl=cudnn is an attention implementation; use xla, "
                          "reference, pallas_triton, pallas_mosaic or None")
    if impl is Impl.PALLAS_MOSAIC:
        check_mosaic_device("linear")
    fused = m <= defaults.FUSED_MAX_M[w.kind] or w.kind is QuantKind.INT8
    if (impl is Impl.PALLAS_MOSAIC
            and defaults.mosaic_applies(w.kind, w.blocksize, k, m, x.dtype)):
        from fastlora_jax.kernels.nf4_matmul_mgpu import nf4_matmul_mosaic

        y = nf4_matmul_mosaic(x2, w)
    elif impl.pallas and fused and defaults.fused_applies(w.kind, w.blocksize, k):
        if w.kind is QuantKind.NF4:
            from fastlora_jax.kernels.nf4_matmul import nf4_matmul

            y = nf4_matmul(x2, w)
        else:
            from fastlora_jax.kernels.int8_matmul import int8_matmul

            y = int8_matmul(x2, w)
    elif impl.pallas and defaults.dequant_applies(w.kind, w.blocksize, x.dtype):
        from fastlora_jax.kernels.nf4_dequant import dequant_then_dot

        y = dequant_then_dot(x2, w)
    elif default and not on_gpu() and matvec_is_default(m, w):
        y = quantized_matvec(x2, w)   # few rows on CPU: dequantization fused, no dense copy
    elif impl is Impl.REFERENCE:
        y = jnp.dot(x2, dequantize(w, x.dtype).T)
    else:
        y = _dequant_dot(x2, w)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear(x: jax.Array, w: jax.Array | QTensor, bias: jax.Array | None = None, *,
           impl: Impl | str | None = None,
           axes: tuple[str | None, str | None] | None = None) -> jax.Array:
    """x [..., in] @ w[out, in].T -> [..., out] in x's dtype (float32 accumulation).

    `impl` (QTensor weights only; see the module docstring): None = the measured default.
    `axes`: w's logical (out, in) names; under a context mesh the op then runs per shard
    (`ops/partition.py`)."""
    if axes is not None and partition.active_mesh() is not None:
        y = partition.linear(lambda xl, wl: linear(xl, wl, impl=impl), x, w, axes)
        return y if bias is None else y + bias.astype(y.dtype)
    if isinstance(w, QTensor):
        y = _quantized_linear(x, w, as_impl(impl, "linear"))
    else:
        # Output in x's dtype straight from the GEMM (accumulation is float32 on GPU tensor cores
        # and in XLA's CPU dots); asking for a float32 output then casting costs a round trip of
        # [tokens, out] float32 through memory per projection, forward and backward.
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y
