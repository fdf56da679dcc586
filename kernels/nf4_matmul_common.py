"""Shared pieces of the fused weight-only-quantized matmul kernels (NF4 and int8).

The tuning dataclass, padding helpers and the zero cotangent for the frozen weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import KernelError
from fastlora_jax.quant import QTensor


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class MatmulTuning:
    """Tile sizes of one fused quantized matmul launch (Pallas, Triton backend on GPU).

    block_m: rows of x per program; block_n: output features (weight rows) per program in the
    forward and weight rows per reduction step in the backward; block_k: reduction (forward) /
    output (backward) columns per step, a multiple of the 64-element quantization block. All are
    powers of two; block_k is lowered to the largest power of two that divides K.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if not _is_pow2(value):
                raise KernelError(f"MatmulTuning.{name}={value} must be a power of two")
        if self.block_m < 16 or self.block_n < 16:
            raise KernelError(f"MatmulTuning block_m={self.block_m}, block_n={self.block_n}: "
                              f"both must be >= 16 (the tensor-core tile)")
        if self.block_k < 64:
            raise KernelError(f"MatmulTuning.block_k={self.block_k} must be >= 64 (one "
                              f"quantization block)")
        if self.num_stages < 1:
            raise KernelError(f"MatmulTuning.num_stages={self.num_stages} must be >= 1")

    def k_step(self, k: int, quantum: int = 64) -> int:
        """Largest power of two <= block_k that divides k (k must be a multiple of `quantum`)."""
        if k % quantum:
            raise KernelError(f"K={k} must be a multiple of {quantum} for the fused kernel; "
                              f"use the dequantize-then-dot path (ops.linear does) for this shape")
        step = self.block_k
        while k % step:
            step //= 2
        return step


def pad_axis(a: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad `axis` of `a` up to a multiple of `multiple` (no copy when already aligned)."""
    size = a.shape[axis]
    extra = (-size) % multiple
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def zero_cotangent(w: QTensor) -> QTensor:
    """A cotangent for the frozen weight: float0 for integer leaves, zeros for float leaves."""
    def zero(a: jax.Array) -> jax.Array | np.ndarray:
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.zeros(a.shape, a.dtype)
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jax.tree_util.tree_map(zero, w)


def check_x(x: jax.Array, w: QTensor, op: str) -> None:
    """x must be [M, K] floating with K = w.shape[1], and w one matrix (no leading axes)."""
    if w.lead:
        raise KernelError(f"{op}: w has leading axes {w.lead}; index one matrix (w[i]) first")
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise KernelError(f"{op}: x.shape={x.shape} must be [M, K] with K = w.shape[1] = "
                          f"{w.shape[1]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise KernelError(f"{op}: x.dtype={x.dtype} must be a floating dtype")


def check_dy(dy: jax.Array, w: QTensor, op: str) -> None:
    """dy must be [M, N] with N = w.shape[0], and w one matrix (no leading axes)."""
    if w.lead or dy.ndim != 2 or dy.shape[1] != w.shape[0]:
        raise KernelError(f"{op}: dy.shape={dy.shape} must be [M, N] with N = "
                          f"w.shape[0] = {w.shape[0]} (w one matrix, lead={w.lead})")


def default_interpret() -> bool:
    """Interpret Pallas kernels everywhere but on GPU."""
    return jax.default_backend() != "gpu"
