"""Weight-only int8 (per output channel): quantize, and import bitsandbytes' LLM.int8 weights."""

from __future__ import annotations

import numpy as np

from fastlora_jax.errors import CheckpointError, KernelError
from fastlora_jax.quant.qtensor import QTensor, QuantKind


def quantize_int8(w: np.ndarray, *, dtype: str | np.dtype | None = None) -> QTensor:
    """w [*lead, N, K] -> INT8 QTensor: scale = max|row| / 127, codes = round-half-even(w / scale)."""
    w = np.asarray(w)
    if w.ndim < 2:
        raise KernelError(f"quantize_int8: w.shape={w.shape} must be [*lead, N, K] with ndim >= 2")
    name = np.dtype(dtype if dtype is not None else w.dtype).name
    wf = w.astype(np.float32)
    scale = (np.abs(wf).max(axis=-1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint(wf / safe[..., None]), -127, 127).astype(np.int8)
    return QTensor(codes=codes, scale=scale, shape=tuple(w.shape[-2:]), dtype=name,
                   kind=QuantKind.INT8)


def from_bnb_int8(weight: np.ndarray, scb: np.ndarray, *, dtype: str = "bfloat16",
                  name: str = "weight") -> QTensor:
    """bitsandbytes Int8Params: weight int8 [N, K], SCB float32 [N] (W = weight * SCB / 127)."""
    weight, scb = np.asarray(weight), np.asarray(scb)
    if weight.dtype != np.int8 or weight.ndim != 2:
        raise CheckpointError(f"{name}: expected an int8 [out, in] matrix, found dtype={weight.dtype} "
                              f"shape={weight.shape}; was this checkpoint saved with load_in_8bit?")
    if scb.shape != weight.shape[:1]:
        raise CheckpointError(f"{name}.SCB: expected shape {weight.shape[:1]} (one scale per output "
                              f"row), found {scb.shape}; the checkpoint is incomplete or corrupt")
    scale = (scb.astype(np.float32) / np.float32(127.0)).astype(np.float32)
    return QTensor(codes=weight, scale=scale, shape=tuple(weight.shape), dtype=dtype,
                   kind=QuantKind.INT8)
