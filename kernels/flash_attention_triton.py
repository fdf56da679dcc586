"""Flash attention on the Triton backend (any CUDA GPU; interpreted on the CPU): forward, dq and
dk/dv kernels, and their tiles (`TritonBlockSizes`).

All arrays here are already padded by `flash_attention.py`:
  q, do [B, Tq, H, D]; k, v [B, Tk, Hkv, D]; Tq % block_q == 0, Tk % block_kv == 0, D a power of 2.
  q_seg [B, Tq] int32, kv_seg [B, Tk] int32 (or None);
  lse, delta [B, H, Tq] float32;
  ranges [B, 4, n_blocks] int32 (`attention_mask.visit_ranges`): the *other* axis' blocks in
  [lo, hi) are visited, so blocks the mask hides whole are never loaded; those in
  [full_lo, full_hi) are entirely visible and skip the mask arithmetic.
Math in float32; matmul inputs stay in the input dtype (bf16/fp16) with float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.attention_mask import MaskSpec
from fastlora_jax.ops import defaults


@dataclasses.dataclass(frozen=True)
class TritonBlockSizes:
    """Tiles (rows of the sequence per program) and launch parameters of the three kernels.

    block_q / block_kv: the forward; *_dq: the dq kernel; *_dkv: the dk/dv kernel; num_warps /
    num_stages: the forward's launch, *_bwd: both backward kernels'. Blocks are powers of two
    >= 16 (shrunk to the padded sequence by `flash_attention`); num_warps a power of two in
    [1, 16]; stages >= 1. `for_head_dim` gives the measured defaults (ops/defaults.py).
    """

    block_q: int
    block_kv: int
    block_q_dq: int
    block_kv_dq: int
    block_q_dkv: int
    block_kv_dkv: int
    num_warps: int
    num_warps_bwd: int
    num_stages: int
    num_stages_bwd: int

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv",
                     "block_kv_dkv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise KernelError(f"TritonBlockSizes.{name}={value!r} must be a power of two "
                                  f">= 16")
        for name in ("num_warps", "num_warps_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 16 or value & (value - 1):
                raise KernelError(f"TritonBlockSizes.{name}={value!r} must be a power of two in "
                                  f"[1, 16]")
        for name in ("num_stages", "num_stages_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KernelError(f"TritonBlockSizes.{name}={value!r} must be an int >= 1")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> TritonBlockSizes:
        """The measured tiles for this head_dim (up to 256)."""
        return cls(**defaults.up_to(defaults.TRITON_ATTENTION_BLOCKS, head_dim))


def _block_mask(spec: MaskSpec, rows: jax.Array, cols: jax.Array, q_seg: jax.Array | None,
          kv_seg: jax.Array | None) -> jax.Array | None:
    """Visibility [len(rows), len(cols)] (True = visible), or None when nothing is masked."""
    pos = rows[:, None] + spec.offset
    col = cols[None, :]
    mask = None

    def both(a: jax.Array | None, b: jax.Array) -> jax.Array:
        return b if a is None else a & b

    if spec.kv_padded:
        mask = both(mask, jnp.broadcast_to(col < spec.seq_kv, (rows.shape[0], cols.shape[0])))
    if spec.causal:
        mask = both(mask, col <= pos)
    if spec.sliding_window is not None:
        mask = both(mask, col > pos - spec.sliding_window)
    if spec.has_segments:
        mask = both(mask, q_seg[:, None] == kv_seg[None, :])
    return mask


def _dot_f32(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
         precision: Any = None) -> jax.Array:
    """2-D matmul with float32 accumulation; trans_* contract over the other axis."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scores(q: jax.Array, k: jax.Array, scale: float, softcap: float | None,
            precision: Any) -> tuple[jax.Array, jax.Array | None]:
    """Scaled (and soft-capped) scores [bq, bk] float32, plus tanh for the softcap gradient."""
    s = _dot_f32(q, k, trans_b=True, precision=precision) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _apply_mask(spec: MaskSpec, s: jax.Array, rows: jax.Array, start: jax.Array, block_kv: int,
                q_seg: jax.Array | None, kvseg_ref) -> jax.Array:
    """Scores with invisible (row, key) pairs set to -inf; keys start at `start`."""
    cols = start + jnp.arange(block_kv, dtype=jnp.int32)
    kv_seg = kvseg_ref[pl.ds(start, block_kv)] if spec.has_segments else None
    mask = _block_mask(spec, rows, cols, q_seg, kv_seg)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _three_loops(ranges_ref, i: jax.Array, body: Callable, carry: Any) -> Any:
    """Run body(j, carry, masked) over [lo, full_lo) masked, [full_lo, full_hi) unmasked,
    [full_hi, hi) masked, where (lo, full_lo, full_hi, hi) = ranges_ref[:, i]."""
    lo, full_lo, full_hi, hi = (ranges_ref[r, i] for r in range(4))
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _triton_forward_kernel(ranges_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref,
                           lse_ref, *, spec: MaskSpec, scale: float, softcap: float | None,
                           block_q: int, block_kv: int, precision: Any) -> None:
    """One (batch, head, query block): o [bq, D], lse [bq]."""
    i = pl.program_id(2)
    q = q_ref[...]
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    q_seg = qseg_ref[...] if spec.has_segments else None
    d = q.shape[-1]

    def body(j, carry, masked: bool):
        acc, m, l = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s, _ = _scores(q, k, scale, softcap, precision)
        if masked:
            s = _apply_mask(spec, s, rows, start, block_kv, q_seg, kvseg_ref)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot_f32(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    acc = jnp.zeros((block_q, d), jnp.float32)
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    acc, m, l = _three_loops(ranges_ref, i, body, (acc, m, l))
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _triton_dq_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                      kvseg_ref, dq_ref, *, spec: MaskSpec, scale: float, softcap: float | None,
                      block_q: int, block_kv: int, precision: Any) -> None:
    """One (batch, head, query block): dq [bq, D]."""
    i = pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    q_seg = qseg_ref[...] if spec.has_segments else None

    def body(j, dq, masked: bool):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s, t = _scores(q, k, scale, softcap, precision)
        if masked:
            s = _apply_mask(spec, s, rows, start, block_kv, q_seg, kvseg_ref)
        p = jnp.exp(s - lse[:, None])
        dp = _dot_f32(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot_f32(ds.astype(k.dtype), k, precision=precision)

    dq = _three_loops(ranges_ref, i, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _triton_dkv_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                       kvseg_ref, dk_ref, dv_ref, *, spec: MaskSpec, scale: float,
                       softcap: float | None, block_q: int, block_kv: int,
                       precision: Any) -> None:
    """One (batch, query head, key block): this head's share of dk, dv [bk, D] (float32)."""
    j = pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    cols = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
    kv_seg = kvseg_ref[...] if spec.has_segments else None

    def body(i, carry, masked: bool):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q)]
        delta = delta_ref[pl.ds(start, block_q)]
        s, t = _scores(q, k, scale, softcap, precision)
        if masked:
            rows = start + jnp.arange(block_q, dtype=jnp.int32)
            q_seg = qseg_ref[pl.ds(start, block_q)] if spec.has_segments else None
            mask = _block_mask(spec, rows, cols, q_seg, kv_seg)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot_f32(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = _dot_f32(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + _dot_f32(ds.astype(q.dtype), q, trans_a=True, precision=precision)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _three_loops(ranges_ref, j, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _triton_params(interpret: bool, num_warps: int, num_stages: int) -> dict[str, Any]:
    if interpret:
        return dict(interpret=True)
    return dict(compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                                         num_stages=num_stages))


def triton_forward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
                   kv_seg: jax.Array | None, ranges: jax.Array, *, spec: MaskSpec, scale: float,
                   softcap: float | None, blocks: TritonBlockSizes,
                   interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Padded forward: (o [B, Tq, H, D], lse [B, H, Tq] float32)."""
    block_q, block_kv = blocks.block_q, blocks.block_kv
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    nq = tq // block_q
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_triton_forward_kernel, spec=spec, scale=scale, softcap=softcap,
                               block_q=block_q, block_kv=block_kv, precision=precision)
    seg_specs = ([pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i)),
                  pl.BlockSpec((None, tk), lambda bi, hi, i: (bi, 0))]
                 if spec.has_segments else [None, None])
    return pl.pallas_call(
        kernel,
        grid=(b, h, nq),
        in_specs=[
            pl.BlockSpec((None, 4, ranges.shape[-1]), lambda bi, hi, i: (bi, 0, 0)),
            pl.BlockSpec((None, block_q, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            *seg_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, block_q), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        name="flash_attention_fwd",
        **_triton_params(interpret, blocks.num_warps, blocks.num_stages),
    )(ranges, q, k, v, q_seg, kv_seg)


def triton_dq(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
              delta: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
              ranges: jax.Array, *, spec: MaskSpec, scale: float, softcap: float | None,
              blocks: TritonBlockSizes, interpret: bool) -> jax.Array:
    """dq [B, Tq, H, D] in q's dtype."""
    block_q, block_kv = blocks.block_q_dq, blocks.block_kv_dq
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_triton_dq_kernel, spec=spec, scale=scale, softcap=softcap,
                               block_q=block_q, block_kv=block_kv, precision=precision)
    seg_specs = ([pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i)),
                  pl.BlockSpec((None, tk), lambda bi, hi, i: (bi, 0))]
                 if spec.has_segments else [None, None])
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda bi, hi, i: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, tk, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda bi, hi, i: (bi, hi, i))
    return pl.pallas_call(
        kernel,
        grid=(b, h, tq // block_q),
        in_specs=[pl.BlockSpec((None, 4, ranges.shape[-1]), lambda bi, hi, i: (bi, 0, 0)),
                  q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
        **_triton_params(interpret, blocks.num_warps_bwd, blocks.num_stages_bwd),
    )(ranges, q, k, v, do, lse, delta, q_seg, kv_seg)


def triton_dkv(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
               delta: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
               ranges: jax.Array, *, spec: MaskSpec, scale: float, softcap: float | None,
               blocks: TritonBlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """dk, dv [B, Tk, Hkv, D] float32 (summed over each kv head's group of query heads)."""
    block_q, block_kv = blocks.block_q_dkv, blocks.block_kv_dkv
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_triton_dkv_kernel, spec=spec, scale=scale, softcap=softcap,
                               block_q=block_q, block_kv=block_kv, precision=precision)
    seg_specs = ([pl.BlockSpec((None, tq), lambda bi, hi, j: (bi, 0)),
                  pl.BlockSpec((None, block_kv), lambda bi, hi, j: (bi, j))]
                 if spec.has_segments else [None, None])
    q_spec = pl.BlockSpec((None, tq, None, d), lambda bi, hi, j: (bi, 0, hi, 0))
    kv_spec = pl.BlockSpec((None, block_kv, None, d), lambda bi, hi, j: (bi, j, hi // g, 0))
    row_spec = pl.BlockSpec((None, None, tq), lambda bi, hi, j: (bi, hi, 0))
    out_spec = pl.BlockSpec((None, block_kv, None, d), lambda bi, hi, j: (bi, j, hi, 0))
    dk, dv = pl.pallas_call(
        kernel,
        grid=(b, h, tk // block_kv),
        in_specs=[pl.BlockSpec((None, 4, ranges.shape[-1]), lambda bi, hi, j: (bi, 0, 0)),
                  q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((b, tk, h, d), jnp.float32)] * 2,
        name="flash_attention_dkv",
        **_triton_params(interpret, blocks.num_warps_bwd, blocks.num_stages_bwd),
    )(ranges, q, k, v, do, lse, delta, q_seg, kv_seg)
    if g > 1:
        dk = dk.reshape(b, tk, hkv, g, d).sum(axis=3)
        dv = dv.reshape(b, tk, hkv, g, d).sum(axis=3)
    return dk, dv
