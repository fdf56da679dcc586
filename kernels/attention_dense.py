"""Softmax attention over whole [seq_q, seq_kv] score matrices with a hand-written backward: the
CPU's attention (XLA:CPU has no fused attention kernel).

Same semantics as `attention_reference.py` (float32 inside, a query with no visible key gives
zeros), laid out for XLA:CPU's batched GEMMs:
- the `groups` query heads that share a kv head are one [groups * seq_q, head_dim] operand, so
  each GEMM runs once per (batch, kv head) with `groups` times the rows;
- the forward keeps q, k, v, the output and the per-row log-sum-exp (no [T, T] residual), and the
  backward recomputes the probabilities from the log-sum-exp in one pass, without the row max
  and sum the reference's autodiff recomputes;
- the backward recomputes the scores transposed ([keys, queries]: a GEMM as cheap as the
  forward's), so dv = p^T do and dk = ds^T q contract their leading axis without XLA writing a
  transposed copy of a [T, T] matrix, which autodiff of the reference does for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fastlora_jax.kernels.attention_mask import dense_mask


def _heads(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, Hkv, G, T, D] in float32 (query head h = kv head h // G, group h % G)."""
    b, t, h, d = x.shape
    return x.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _kv(x: jax.Array) -> jax.Array:
    """[B, S, Hkv, D] -> [B, Hkv, S, D] in float32."""
    return x.astype(jnp.float32).transpose(0, 2, 1, 3)


def _unheads(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[B, Hkv, G, T, D] -> [B, T, Hkv * G, D] in `dtype`."""
    b, k, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d).astype(dtype)


def _capped(s: jax.Array, softcap: float | None) -> jax.Array:
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                    kv_segment_ids: jax.Array | None, bidirectional_ids: jax.Array | None,
                    causal: bool, sliding_window: int | None, softcap: float | None,
                    scale: float) -> jax.Array:
    """q [B, T, H, D], k / v [B, S, Hkv, D], segment ids [B, T] / [B, S] or None, bidirectional
    ids [B, T] or None (`attention_mask.dense_mask`) -> [B, T, H, D] in q's dtype. `scale`
    multiplies q.k (the caller resolves its default)."""
    return _forward(q, k, v, segment_ids, kv_segment_ids, bidirectional_ids, causal,
                    sliding_window, softcap, scale)[0]


def _mask(q: jax.Array, k: jax.Array, segment_ids, kv_segment_ids, bidirectional_ids, causal,
          sliding_window):
    """[B or 1, 1, 1, T, S] boolean (True = visible)."""
    return dense_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window,
                      q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                      bidirectional_ids=bidirectional_ids)[:, :, None]


def _forward(q, k, v, segment_ids, kv_segment_ids, bidirectional_ids, causal, sliding_window,
             softcap, scale):
    qh, kh, vh = _heads(q, k.shape[2]), _kv(k), _kv(v)
    s = _capped(jnp.einsum("bkgtd,bksd->bkgts", qh, kh) * scale, softcap)   # [B,Hkv,G,T,S]
    mask = _mask(q, k, segment_ids, kv_segment_ids, bidirectional_ids, causal, sliding_window)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)                                   # masked entries: exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    denom = jnp.where(denom == 0.0, 1.0, denom)          # no visible key: output 0
    o = jnp.einsum("bkgts,bksd->bkgtd", p, vh) / denom
    lse = (m + jnp.log(denom))[..., 0]                   # [B,Hkv,G,T]
    out = _unheads(o, q.dtype)
    return out, (q, k, v, segment_ids, kv_segment_ids, bidirectional_ids, out, lse)


def _fwd(q, k, v, segment_ids, kv_segment_ids, bidirectional_ids, causal, sliding_window,
         softcap, scale):
    return _forward(q, k, v, segment_ids, kv_segment_ids, bidirectional_ids, causal,
                    sliding_window, softcap, scale)


def _bwd(causal, sliding_window, softcap, scale, res, dout):
    q, k, v, segment_ids, kv_segment_ids, bidirectional_ids, out, lse = res
    kv_heads = k.shape[2]
    qh, kh, vh = _heads(q, kv_heads), _kv(k), _kv(v)
    do = _heads(dout, kv_heads)
    delta = jnp.sum(do * _heads(out, kv_heads), axis=-1)                   # [B,Hkv,G,T]
    # Transposed: keys on the rows. lse / delta broadcast along the last (query) axis.
    st = _capped(jnp.einsum("bksd,bkgtd->bksgt", kh, qh) * scale, softcap)  # [B,Hkv,S,G,T]
    mask = _mask(q, k, segment_ids, kv_segment_ids, bidirectional_ids, causal, sliding_window)
    mask_t = jnp.swapaxes(mask[:, :, 0], -1, -2)[:, :, :, None, :]          # [B|1,1,S,1,T]
    pt = jnp.where(mask_t, jnp.exp(st - lse[:, :, None]), 0.0)
    dv = jnp.einsum("bksgt,bkgtd->bksd", pt, do)
    dpt = jnp.einsum("bksd,bkgtd->bksgt", vh, do)
    dst = pt * (dpt - delta[:, :, None])
    if softcap is not None:
        dst = dst * (1.0 - jnp.square(st / softcap))     # d(c tanh(x / c)) / dx
    dst = dst * scale
    dk = jnp.einsum("bksgt,bkgtd->bksd", dst, qh)
    dq = jnp.einsum("bksgt,bksd->bkgtd", dst, kh)
    zeros = lambda ids: None if ids is None else jnp.zeros(ids.shape, jax.dtypes.float0)  # noqa: E731
    return (_unheads(dq, q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
            dv.transpose(0, 2, 1, 3).astype(v.dtype), zeros(segment_ids), zeros(kv_segment_ids),
            zeros(bidirectional_ids))


dense_attention.defvjp(_fwd, _bwd)
