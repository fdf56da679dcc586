"""Frozen-weight linear dispatch: y = x @ W.T (+ b), W in HF layout [out, in].

The model calls `linear(x, w)` for every frozen projection. `w` is a plain array (XLA's dot) or a
`QTensor` (NF4 / int8). For a QTensor:
- Impl.PALLAS: the fused dequantize-matmul kernels (`kernels/nf4_matmul.py`,
  `kernels/int8_matmul.py`); shapes the kernels do not take (NF4 with K % 64 != 0, int8 with
  K % 16 != 0) go through dequantize-then-dot.
- Impl.XLA / Impl.REFERENCE: dequantize-then-dot under the caller's jit (XLA fuses the
  dequantization into one elementwise pass over the weight before the GEMM).
- Default (None): on GPU, the fused forward kernel where it measured at least as fast as XLA's
  dequantize-then-dot on the H200 (`pallas_is_default`: M <= 64 tokens, see
  benchmarks/RESULTS.md); its backward (dx) runs our fused dx kernel where that measured faster
  (`pallas_bwd_is_default`: NF4 with M <= 64) and XLA's dequantize-then-dot otherwise; XLA
  elsewhere. CPU: XLA; for a few rows (`ops/matvec.py`, decode) its fused multiply-and-reduce
  form, which never writes a dense copy of the weight.
  On an H100/H200 the NF4 forward for M <= 16 and bf16 x is the Mosaic GPU kernel
  (`mgpu_tuning_for`), elsewhere the Triton-backend one. An explicit Impl.PALLAS runs the fused
  (Triton-backend) kernels both ways.
- `dequant` (a `Dequant`) picks, for NF4 with bf16 / fp16 x, how the dequantize-then-dot path
  that the default rule takes for M > 64 on GPU dequantizes: XLA's fused elementwise pass or our
  bandwidth-bound kernel (`kernels/nf4_dequant.py`) before the same XLA GEMM, forward and dx.
  GPU default (`pallas_dequant_is_default`): our kernel for 64 < M <= 2048 tokens, XLA above;
  off GPU the default stays XLA and an explicit `Dequant.PALLAS` runs the kernel interpreted.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from fastlora_jax.errors import KernelError
from fastlora_jax.ops.impl import Impl, platform, resolve
from fastlora_jax.ops.matvec import matvec_is_default, quantized_matvec
from fastlora_jax.quant import QTensor, QuantKind, dequantize

if TYPE_CHECKING:
    from fastlora_jax.kernels.weight_stream_mgpu import MgpuTuning

# Largest number of rows (tokens) for which the fused Pallas forward is the GPU default, per kind.
# Measured on the H200 (benchmarks/nf4_matmul.py): at M = 1, 16, 64 the fused forward beat XLA's
# dequantize-then-dot; at M = 2048 and 8192 XLA (one fused dequant pass + cuBLAS-class GEMM) won.
PALLAS_DEFAULT_MAX_M = {QuantKind.NF4: 64, QuantKind.INT8: 64}
# Same for the backward (dx) kernel: NF4's measured 1.17-1.33x XLA at M = 1, 16, 64 (2026-11-29,
# prmt lookup); int8's lost to XLA at every shape (0.87-0.93x, 2026-11-28).
PALLAS_BWD_DEFAULT_MAX_M = {QuantKind.NF4: 64, QuantKind.INT8: 0}


def pallas_is_default(m: int, w: QTensor) -> bool:
    """Whether the GPU default for x [m, K] @ w.T is the fused Pallas kernel."""
    quantum = 64 if w.kind is QuantKind.NF4 else 16
    return m <= PALLAS_DEFAULT_MAX_M[w.kind] and w.shape[1] % quantum == 0


# NF4 forward rows up to which the Hopper Mosaic GPU kernel (kernels/nf4_matmul_mgpu.py) is the
# default on an H100/H200, and its tuning: GPU time from a profiler trace (H200, 2026-11-29,
# fourth session) at K=4096 N=14336, kernel alone: 20.5 / 22.0 us at M = 1 / 16 with 4 blocks per
# step and the absmax on the accumulator (2 blocks per step, absmax on the weights, the previous
# default: 21.1 / 23.1; 8 blocks: 23.9 / 25.7), against 35.5 / 31.9 us for the Triton decode
# kernel; at M = 64 it was slower than the Triton kernel's best tuning (third session).
MGPU_DEFAULT_MAX_M = 16


def mgpu_tuning_for(m: int, w: QTensor, dtype: jnp.dtype, device_kind: str) -> MgpuTuning | None:
    """The MgpuTuning the GPU default uses for NF4 x [m, K] (bf16) on this device, or None."""
    from fastlora_jax.kernels.weight_stream_mgpu import MgpuTuning, tile_for

    hopper = any(name in device_kind for name in ("H100", "H200", "H800"))
    if (not hopper or w.kind is not QuantKind.NF4 or m > MGPU_DEFAULT_MAX_M
            or jnp.dtype(dtype) != jnp.bfloat16 or w.shape[1] % 64):
        return None
    k_blocks = w.shape[1] // 64
    return MgpuTuning(tile_m=tile_for(m), max_concurrent_steps=4, acc_scale=True,
                      blocks_per_step=next(b for b in (4, 2, 1) if k_blocks % b == 0))


class Dequant(enum.Enum):
    """Who dequantizes an NF4 weight on the dequantize-then-dot path (then XLA's GEMM runs)."""

    XLA = "xla"        # XLA's dequantize (one fused elementwise pass over the weight)
    PALLAS = "pallas"  # kernels/nf4_dequant.py (bandwidth-bound, exact), custom VJP for dx


# Largest M for which our dequant kernel + XLA's GEMM is the GPU default (above
# PALLAS_DEFAULT_MAX_M). H200, 2026-11-29 (benchmarks/results/nf4_matmul-2026-11-29-dequant.json):
# M = 2048: faster than XLA's dequantize-then-dot on all 8 training rows (1.14-1.45x, fwd and
# dx); M = 8192: mixed (0.77-1.39x, 5 of 8 rows faster, 1.02x summed), so XLA stays there.
DEQUANT_DEFAULT_MAX_M = 2048


def dequant_kernel_applies(w: QTensor, dtype: jnp.dtype) -> bool:
    """Whether kernels/nf4_dequant.py takes w for x of `dtype` (NF4, blocksize 64, bf16/fp16)."""
    return (w.kind is QuantKind.NF4 and w.blocksize == 64
            and jnp.dtype(dtype).name in ("bfloat16", "float16"))


def pallas_dequant_is_default(m: int, w: QTensor, dtype: jnp.dtype) -> bool:
    """Whether the GPU default dequantize-then-dot for x [m, K] uses our dequant kernel."""
    return m <= DEQUANT_DEFAULT_MAX_M and dequant_kernel_applies(w, dtype)


def pallas_bwd_is_default(m: int, w: QTensor) -> bool:
    """Whether the GPU default for dx of x [m, K] @ w.T (given a fused forward) is our dx kernel."""
    return m <= PALLAS_BWD_DEFAULT_MAX_M[w.kind]


def _quantized_linear(x: jax.Array, w: QTensor, impl: Impl | str | None,
                      dequant: Dequant | str | None) -> jax.Array:
    if w.lead:
        raise KernelError(f"linear: w has leading axes {w.lead}; slice the layer (w[i]) first")
    k = w.shape[1]
    if x.shape[-1] != k:
        raise KernelError(f"linear: x.shape={x.shape} must end in K = w.shape[1] = {k}")
    x2 = x.reshape(-1, k)
    gpu_default = Impl.PALLAS if pallas_is_default(x2.shape[0], w) else Impl.XLA
    which = resolve(impl, gpu_default=gpu_default, cpu_default=Impl.XLA)
    # The default rule: dx by our kernel only where it measured faster than dequantize-then-dot.
    bwd_xla = impl is None and not pallas_bwd_is_default(x2.shape[0], w)
    quantum = 64 if w.kind is QuantKind.NF4 else 16
    if which is Impl.PALLAS and k % quantum == 0:
        if w.kind is QuantKind.NF4:
            from fastlora_jax.kernels.nf4_matmul import nf4_matmul

            on_gpu = platform() == "gpu"
            tuning = (mgpu_tuning_for(x2.shape[0], w, x.dtype, jax.devices()[0].device_kind)
                      if impl is None and on_gpu else None)
            y = nf4_matmul(x2, w, tuning=tuning, bwd_xla=bwd_xla, interpret=not on_gpu)
        else:
            from fastlora_jax.kernels.int8_matmul import int8_matmul

            y = int8_matmul(x2, w, bwd_xla=bwd_xla, interpret=platform() != "gpu")
    elif impl is None and platform() == "cpu" and matvec_is_default(x2.shape[0], w):
        y = quantized_matvec(x2, w)   # few rows on CPU: dequantization fused, no dense copy
    elif impl is None and _dequant_choice(dequant, w, x2) is Dequant.PALLAS:
        if not dequant_kernel_applies(w, x.dtype):
            raise KernelError(f"linear: dequant=Dequant.PALLAS needs an NF4 weight (blocksize 64) "
                              f"and bfloat16 / float16 x; got kind={w.kind.value}, "
                              f"blocksize={w.blocksize}, x.dtype={x.dtype}. Use dequant=None")
        from fastlora_jax.kernels.nf4_dequant import dequant_then_dot

        y = dequant_then_dot(x2, w, interpret=platform() != "gpu")
    else:
        y = jnp.dot(x2, dequantize(w, x.dtype).T)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _dequant_choice(dequant: Dequant | str | None, w: QTensor, x2: jax.Array) -> Dequant:
    """An explicit choice as given; None: the GPU rule (`pallas_dequant_is_default`), else XLA."""
    if dequant is None:
        on_gpu = platform() == "gpu"
        return (Dequant.PALLAS if on_gpu and pallas_dequant_is_default(x2.shape[0], w, x2.dtype)
                else Dequant.XLA)
    try:
        return Dequant(dequant)
    except ValueError:
        raise KernelError(f"linear: dequant={dequant!r} is not one of "
                          f"{[d.value for d in Dequant]}") from None


def linear(x: jax.Array, w: jax.Array | QTensor, bias: jax.Array | None = None, *,
           impl: Impl | str | None = None, dequant: Dequant | str | None = None) -> jax.Array:
    """x [..., in] @ w[out, in].T -> [..., out] in x's dtype (float32 accumulation).

    `dequant` (QTensor only, with impl=None): who dequantizes where the default rule runs
    dequantize-then-dot (see the module docstring); None = the platform default."""
    if isinstance(w, QTensor):
        y = _quantized_linear(x, w, impl, dequant)
    else:
        # Output in x's dtype straight from the GEMM (accumulation is float32 on GPU tensor cores
        # and in XLA's CPU dots); asking for a float32 output then casting costs a round trip of
        # [tokens, out] float32 through memory per projection, forward and backward.
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y
