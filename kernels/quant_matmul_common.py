"""What the weight-only quantized matmul kernels (NF4 and int8) share: the Triton tile tuning,
the argument checks, padding, the split-K rule and the zero cotangent of the frozen weight."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import KernelError
from fastlora_jax.ops import defaults
from fastlora_jax.quant import QTensor, QuantKind, dequantize


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class TritonMatmulTuning:
    """Tiles of one fused quantized matmul launch (Pallas, Triton backend).

    block_m: rows of x (or dy) per program, shrunk to M; block_n: output features (weight rows)
    per program in the forward and weight rows per reduction step in the dx kernel; block_k:
    reduction (forward) / output (dx) columns per step, a multiple of the 64-element
    quantization block, lowered to the largest power of two that divides K. All powers of two.
    splits: split-K factor of the NF4 decode forward (None: `split_k` towards
    defaults.TRITON_SPLIT_PROGRAMS programs). The `for_*` constructors give the measured
    defaults (ops/defaults.py).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    splits: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if not _is_pow2(value):
                raise KernelError(f"TritonMatmulTuning.{name}={value} must be a power of two")
        if self.block_m < 16 or self.block_n < 16:
            raise KernelError(f"TritonMatmulTuning block_m={self.block_m}, "
                              f"block_n={self.block_n}: both must be >= 16 (the tensor-core tile)")
        if self.block_k < 64:
            raise KernelError(f"TritonMatmulTuning.block_k={self.block_k} must be >= 64 (one "
                              f"quantization block)")
        if self.num_stages < 1:
            raise KernelError(f"TritonMatmulTuning.num_stages={self.num_stages} must be >= 1")
        if self.splits is not None and not _is_pow2(self.splits):
            raise KernelError(f"TritonMatmulTuning.splits={self.splits} must be a power of two "
                              f"or None")

    @classmethod
    def for_nf4(cls, m: int) -> TritonMatmulTuning:
        """The NF4 decode forward's tiles for x [m, K] (m <= 64)."""
        return cls(*defaults.up_to(defaults.NF4_TRITON_FORWARD, m))

    @classmethod
    def for_nf4_dx(cls) -> TritonMatmulTuning:
        """The NF4 dx kernel's tiles."""
        return cls(*defaults.NF4_TRITON_DX)

    @classmethod
    def for_int8(cls, m: int) -> TritonMatmulTuning:
        """The int8 forward's tiles for x [m, K]."""
        small = m <= defaults.FUSED_MAX_M[QuantKind.INT8]
        return cls(*(defaults.INT8_TRITON_FORWARD if small
                     else defaults.INT8_TRITON_FORWARD_LARGE_M))

    def k_step(self, k: int, quantum: int = 64) -> int:
        """Largest power of two <= block_k that divides k (k must be a multiple of `quantum`)."""
        if k % quantum:
            raise KernelError(f"K={k} must be a multiple of {quantum} for the fused kernel; "
                              f"use the dequantize-then-dot path (ops.linear does) for this shape")
        step = self.block_k
        while k % step:
            step //= 2
        return step


def split_k(tiles: int, steps: int, target: int) -> int:
    """Power-of-two split of a K loop of `steps` steps, until tiles * splits >= target programs
    (at most 16, and only while it divides the steps)."""
    splits = 1
    while tiles * splits < target and steps % (2 * splits) == 0 and splits < 16:
        splits *= 2
    return splits


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


def xla_dx(dy: jax.Array, w: QTensor) -> jax.Array:
    """dx = dy @ dequantize(w) by XLA (float32 accumulation, dy's dtype out): the backward of the
    fused forwards that have no dx kernel of their own."""
    dx = jnp.dot(dy, dequantize(w, dy.dtype), preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype)
