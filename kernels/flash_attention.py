"""Flash attention for training: the public op (a jax.custom_vjp) and which kernels it runs.

Shapes: q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim] with
heads % kv_heads == 0 (GQA/MQA: query head h reads kv head h // (heads // kv_heads); K/V are never
repeated in memory). Output: q's shape and dtype. Semantics are exactly those of
`attention_reference.flash_attention_reference` (causal mask aligned bottom-right, sliding window,
segment ids, logit soft-capping, custom scale); accumulation in float32.

Packed sequences: `segment_ids` [batch, seq_q] (kv_segment_ids defaults to it) restrict attention
to tokens of the same segment. The causal and window masks use the token index inside the row; for
contiguous packing that is the same as the per-token position inside each document (positions
restart at 0 in each segment, and both the index and the position grow by one per token), so the
positions used for RoPE need not be passed here.

Kernels: `flash_attention_triton.py` (Pallas on the Triton backend: any CUDA GPU) and, on Hopper,
`flash_attention_mgpu.py` / `flash_attention_mgpu_bwd.py` (Mosaic GPU: TMA, wgmma, warp
specialisation) where they take the call (head_dim a multiple of 64, the backward up to 128;
bf16 / fp16); the Triton kernels run the rest. Off the GPU every kernel runs interpreted. Whole
blocks the mask hides are never loaded (`attention_mask.py`). Memory is O(seq): the residuals
are the output and a float32 log-sum-exp per query row.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.attention_mask import MaskSpec, block_visibility, visit_ranges
from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.kernels.flash_attention_mgpu import (MosaicBlockSizes, mosaic_forward,
                                                       mosaic_forward_supports)
from fastlora_jax.kernels.flash_attention_mgpu_bwd import (mosaic_backward_supports, mosaic_dkv,
                                                           mosaic_dq)
from fastlora_jax.kernels.flash_attention_triton import (TritonBlockSizes, triton_dkv, triton_dq,
                                                         triton_forward)
from fastlora_jax.ops import defaults
from fastlora_jax.ops.impl import Impl, as_impl, check_mosaic_device, interpreted, is_hopper

__all__ = ["MosaicBlockSizes", "TritonBlockSizes", "flash_attention", "flash_attention_reference"]

_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: a nondiff argument of the custom_vjp)."""

    spec: MaskSpec
    scale: float
    softcap: float | None
    triton: TritonBlockSizes
    mosaic: MosaicBlockSizes
    interpret: bool
    use_mgpu: bool  # the forward runs the Mosaic GPU kernel
    use_mgpu_bwd: bool  # the backward runs the Mosaic GPU kernels


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, sliding_window: int | None,
           softcap: float | None, scale: float | None) -> None:
    """Raise KernelError naming the offending value when the call is unsupported."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise KernelError(f"q, k, v must be 4-D [batch, seq, heads, head_dim]; got {q.shape=}, "
                          f"{k.shape=}, {v.shape=}")
    batch, seq_q, heads, head_dim = q.shape
    if k.shape != v.shape:
        raise KernelError(f"k and v must have the same shape; got {k.shape=} and {v.shape=}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise KernelError(f"k must be [batch={batch}, seq_kv, kv_heads, head_dim={head_dim}]; "
                          f"got {k.shape=}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise KernelError(f"{heads=} must be a multiple of {kv_heads=}")
    if head_dim > _MAX_HEAD_DIM or head_dim < 1:
        raise KernelError(f"{head_dim=} must be in [1, {_MAX_HEAD_DIM}]")
    if seq_q == 0 or k.shape[1] == 0:
        raise KernelError(f"sequence lengths must be positive; got {seq_q=}, seq_kv={k.shape[1]}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelError(f"q, k, v must share one dtype of bfloat16/float16/float32; got "
                          f"{q.dtype=}, {k.dtype=}, {v.dtype=}")
    for name, seg, length in (("segment_ids", segment_ids, seq_q),
                              ("kv_segment_ids", kv_segment_ids, k.shape[1])):
        if seg is None:
            continue
        if seg.shape != (batch, length):
            raise KernelError(f"{name}.shape={seg.shape} must be (batch, seq)=({batch}, {length})")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise KernelError(f"{name}.dtype={seg.dtype} must be an integer type")
    if kv_segment_ids is not None and segment_ids is None:
        raise KernelError("kv_segment_ids given without segment_ids; pass both or neither")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelError(f"{sliding_window=} must be a positive int or None")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise KernelError(f"{softcap=} must be a positive number or None")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise KernelError(f"{scale=} must be a finite number or None")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit(block: int, seq: int) -> int:
    """Shrink a block to the sequence (power of two >= 16)."""
    return min(block, max(16, 1 << (seq - 1).bit_length()))


def _fwd_impl(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
              kv_seg: jax.Array | None, r_fwd: jax.Array, cfg: _Config
              ) -> tuple[jax.Array, jax.Array]:
    common = dict(spec=cfg.spec, scale=cfg.scale, softcap=cfg.softcap, interpret=cfg.interpret)
    if cfg.use_mgpu:
        return mosaic_forward(q, k, v, r_fwd, q_seg, kv_seg, blocks=cfg.mosaic, **common)
    return triton_forward(q, k, v, q_seg, kv_seg, r_fwd, blocks=cfg.triton, **common)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
           kv_seg: jax.Array | None, r_fwd: jax.Array, r_dq: jax.Array, r_dkv: jax.Array,
           cfg: _Config) -> jax.Array:
    """Padded attention: o [B, Tq, H, D]."""
    return _fwd_impl(q, k, v, q_seg, kv_seg, r_fwd, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, r_fwd, r_dq, r_dkv, cfg):
    o, lse = _fwd_impl(q, k, v, q_seg, kv_seg, r_fwd, cfg)
    return o, (q, k, v, q_seg, kv_seg, r_dq, r_dkv, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, q_seg, kv_seg, r_dq, r_dkv, o, lse = res
    # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: [B, H, Tq] float32
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    # Padded query rows must contribute exactly nothing: p = exp(s - inf) = 0, delta = 0.
    real = jnp.arange(q.shape[1]) < cfg.spec.seq_q
    lse = jnp.where(real, lse, jnp.inf)
    delta = jnp.where(real, delta, 0.0)
    do = do.astype(q.dtype)
    common = dict(spec=cfg.spec, scale=cfg.scale, softcap=cfg.softcap, interpret=cfg.interpret)
    if cfg.use_mgpu_bwd:
        dq = mosaic_dq(q, k, v, do, lse, delta, r_dq, q_seg, kv_seg, blocks=cfg.mosaic, **common)
        dk, dv = mosaic_dkv(q, k, v, do, lse, delta, r_dkv, q_seg, kv_seg, blocks=cfg.mosaic,
                            **common)
    else:
        dq = triton_dq(q, k, v, do, lse, delta, q_seg, kv_seg, r_dq, blocks=cfg.triton, **common)
        dk, dv = triton_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, r_dkv, blocks=cfg.triton,
                            **common)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    causal: bool = True,
                    segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None,
                    sliding_window: int | None = None,
                    softcap: float | None = None,
                    scale: float | None = None,
                    impl: Impl | str | None = None,
                    triton_blocks: TritonBlockSizes | None = None,
                    mosaic_blocks: MosaicBlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Differentiable flash attention. q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D].

    segment_ids [B, T] int (kv_segment_ids [B, S], defaults to segment_ids); sliding_window: a key j
    is visible from query i iff i + (S - T) - window < j; softcap: scores become
    softcap * tanh(scores / softcap); scale defaults to head_dim ** -0.5. Any T, S (padded inside).
    impl: Impl.PALLAS_MOSAIC (the Mosaic GPU kernels where they take the call, the Triton ones
    for the rest) or Impl.PALLAS_TRITON; None: Mosaic on a Hopper GPU, Triton elsewhere
    (ops/defaults.py). triton_blocks / mosaic_blocks: the tiles (None: `for_head_dim`).
    interpret: run the kernels under Pallas' interpreter (None: off the GPU).
    """
    _check_inputs(q, k, v, segment_ids, kv_segment_ids, sliding_window, softcap, scale)
    impl = as_impl(impl, "flash_attention")
    if impl is None:
        impl = defaults.flash_attention_impl(hopper=is_hopper())
    if not impl.pallas:
        raise KernelError(f"flash_attention: impl={impl.value!r} is not a Pallas implementation; "
                          f"use pallas_triton, pallas_mosaic or None (ops.attention runs the "
                          f"others)")
    if impl is Impl.PALLAS_MOSAIC:
        check_mosaic_device("flash_attention")
    batch, seq_q, heads, head_dim = q.shape
    seq_kv = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    tb = TritonBlockSizes.for_head_dim(head_dim) if triton_blocks is None else triton_blocks
    tb = dataclasses.replace(
        tb, **{f: _fit(getattr(tb, f), seq_q) for f in ("block_q", "block_q_dq", "block_q_dkv")},
        **{f: _fit(getattr(tb, f), seq_kv) for f in ("block_kv", "block_kv_dq", "block_kv_dkv")})
    mb = MosaicBlockSizes.for_head_dim(head_dim) if mosaic_blocks is None else mosaic_blocks
    use_mgpu = impl is Impl.PALLAS_MOSAIC and mosaic_forward_supports(head_dim, q.dtype)
    use_mgpu_bwd = use_mgpu and mosaic_backward_supports(head_dim, q.dtype)
    q_mult = max(tb.block_q, tb.block_q_dq, tb.block_q_dkv,
                 2 * mb.block_q if use_mgpu else 1,
                 2 * mb.block_q_bwd if use_mgpu_bwd else 1)
    kv_mult = max(tb.block_kv, tb.block_kv_dq, tb.block_kv_dkv,
                  mb.block_kv if use_mgpu else 1,
                  2 * mb.block_kv_bwd if use_mgpu_bwd else 1)
    seq_q_pad, seq_kv_pad = _round_up(seq_q, q_mult), _round_up(seq_kv, kv_mult)
    d_pad = max(16, 1 << (head_dim - 1).bit_length())

    spec = MaskSpec(seq_q=seq_q, seq_kv=seq_kv, causal=causal, sliding_window=sliding_window,
                    has_segments=segment_ids is not None, kv_padded=seq_kv_pad != seq_kv)
    cfg = _Config(spec=spec, scale=scale, softcap=None if softcap is None else float(softcap),
                  triton=tb, mosaic=mb,
                  interpret=interpreted() if interpret is None else interpret, use_mgpu=use_mgpu,
                  use_mgpu_bwd=use_mgpu_bwd)

    def pad(x: jax.Array, seq: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, seq - x.shape[1]), (0, 0), (0, d_pad - head_dim)))

    qp, kp, vp = pad(q, seq_q_pad), pad(k, seq_kv_pad), pad(v, seq_kv_pad)
    q_seg = kv_seg = None
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, seq_q_pad - seq_q)),
                        constant_values=-1)
        kv_seg = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, seq_kv_pad - seq_kv)),
                         constant_values=-2)
    vis = lambda bq, bk: block_visibility(spec, bq, bk, seq_q_pad, seq_kv_pad, q_seg, kv_seg)
    r_fwd = visit_ranges(*(vis(2 * mb.block_q, mb.block_kv) if use_mgpu
                           else vis(tb.block_q, tb.block_kv)))
    if use_mgpu_bwd:  # CTAs of two warpgroups: 2 * block rows (dq) / keys (dkv)
        bq, bk = mb.block_q_bwd, mb.block_kv_bwd
        r_dq = visit_ranges(*vis(2 * bq, bk))
        r_dkv = visit_ranges(*(jnp.swapaxes(x, 1, 2) for x in vis(bq, 2 * bk)))
    else:
        r_dq = visit_ranges(*vis(tb.block_q_dq, tb.block_kv_dq))
        r_dkv = visit_ranges(*(jnp.swapaxes(x, 1, 2)
                               for x in vis(tb.block_q_dkv, tb.block_kv_dkv)))
    r_fwd, r_dq, r_dkv = (jnp.broadcast_to(r, (batch,) + r.shape[1:]) for r in (r_fwd, r_dq, r_dkv))
    o = _flash(qp, kp, vp, q_seg, kv_seg, r_fwd, r_dq, r_dkv, cfg)
    return o[:, :seq_q, :, :head_dim]
