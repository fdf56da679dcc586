"""Who sees whom in attention: the dense mask of the reference and the block-level visibility the
kernels use to skip whole blocks.

A query at index i sees key j iff
  (not causal or j <= i + offset)  and  (window is None or j > i + offset - window)
  and (no segment ids or q_segment_ids[i] == kv_segment_ids[j]),
with offset = seq_kv - seq_q (the causal mask is aligned bottom-right). Bidirectional ids (a
vision-language model's image tokens, e.g. Gemma 3's) widen the causal term: two tokens of one
sequence with the same nonzero id see each other in both directions, still within the window's
lower bound and their segment (transformers' (causal or same block) and window). Only the dense
mask knows them, so the kernels never receive them. `dense_mask` spells this
out as a [seq_q, seq_kv] boolean array (the reference and the XLA / cuDNN paths use it);
`block_visibility` and `visit_ranges` reduce it to tiles, so a kernel never loads a block the
mask hides whole (above the causal diagonal, outside the window, across packed documents) and
skips the mask arithmetic on blocks it shows whole.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def dense_mask(seq_q: int, seq_kv: int, *, causal: bool, sliding_window: int | None,
               q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
               bidirectional_ids: jax.Array | None = None) -> jax.Array:
    """Boolean mask [batch or 1, 1, seq_q, seq_kv] (True = visible).

    bidirectional_ids [batch, seq] int32 (seq_q == seq_kv): tokens sharing a nonzero id see each
    other both ways (0 = an ordinary token)."""
    offset = seq_kv - seq_q
    qi = jnp.arange(seq_q)[:, None] + offset
    kj = jnp.arange(seq_kv)[None, :]
    mask = jnp.ones((seq_q, seq_kv), dtype=bool)
    if causal:
        mask &= kj <= qi
    mask = mask[None, None]
    if bidirectional_ids is not None:
        if seq_q != seq_kv:
            raise ValueError(f"bidirectional ids need seq_q == seq_kv, got {seq_q=} {seq_kv=}")
        ids = bidirectional_ids
        mask = mask | ((ids[:, None, :, None] == ids[:, None, None, :])
                       & (ids[:, None, :, None] > 0))
    if sliding_window is not None:
        mask &= (kj > qi - sliding_window)[None, None]
    if q_segment_ids is not None:
        seg = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = mask & seg
    return mask


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the mask, in original (unpadded) coordinates."""

    seq_q: int                 # real query length
    seq_kv: int                # real key length; keys at index >= seq_kv are padding
    causal: bool
    sliding_window: int | None
    has_segments: bool
    kv_padded: bool            # whether the padded key length exceeds seq_kv

    @property
    def offset(self) -> int:
        """Query i sits at key position i + offset (bottom-right aligned causal mask)."""
        return self.seq_kv - self.seq_q


def block_visibility(spec: MaskSpec, block_q: int, block_kv: int, seq_q_pad: int,
                     seq_kv_pad: int, q_seg: jax.Array | None, kv_seg: jax.Array | None
                     ) -> tuple[jax.Array, jax.Array]:
    """Per block pair (i, j): (any pair visible, every pair visible), bool [batch or 1, nq, nk].

    Padded query rows count as visible (their outputs are dropped and their gradients are zero);
    padded keys as invisible. Size O((seq / block)^2) booleans: a few hundred thousand at 65,536.
    """
    nq, nk = seq_q_pad // block_q, seq_kv_pad // block_kv
    r0 = jnp.arange(nq) * block_q                       # first row of each query block
    r1 = jnp.minimum(r0 + block_q, spec.seq_q) - 1      # last real row
    c0 = jnp.arange(nk) * block_kv
    c1 = c0 + block_kv - 1
    any_ = (r0 < spec.seq_q)[:, None] & (c0 < spec.seq_kv)[None, :]
    all_ = any_ & (c1 < spec.seq_kv)[None, :]
    if spec.causal:  # some key at or before the last row's position / all before the first row's
        any_ &= c0[None, :] <= (r1 + spec.offset)[:, None]
        all_ &= c1[None, :] <= (r0 + spec.offset)[:, None]
    if spec.sliding_window is not None:  # some key / every key inside the window
        any_ &= jnp.minimum(c1, spec.seq_kv - 1)[None, :] > (
            r0 + spec.offset - spec.sliding_window)[:, None]
        all_ &= c0[None, :] > (r1 + spec.offset - spec.sliding_window)[:, None]
    any_, all_ = any_[None], all_[None]
    if q_seg is not None:
        big = jnp.iinfo(jnp.int32).max
        real_q = (jnp.arange(seq_q_pad) < spec.seq_q)[None, :]
        real_k = (jnp.arange(seq_kv_pad) < spec.seq_kv)[None, :]
        qb = lambda x: x.reshape(x.shape[0], nq, block_q)
        kb = lambda x: x.reshape(x.shape[0], nk, block_kv)
        q_min = qb(jnp.where(real_q, q_seg, big)).min(-1)[:, :, None]
        q_max = qb(jnp.where(real_q, q_seg, -big)).max(-1)[:, :, None]
        k_min = kb(jnp.where(real_k, kv_seg, big)).min(-1)[:, None, :]
        k_max = kb(jnp.where(real_k, kv_seg, -big)).max(-1)[:, None, :]
        any_ = any_ & (k_max >= q_min) & (k_min <= q_max)
        all_ = all_ & (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    return any_, all_


def visit_ranges(any_: jax.Array, all_: jax.Array) -> jax.Array:
    """(lo, full_lo, full_hi, hi) along the last axis: int32 [B, 4, n].

    [lo, hi) spans the True entries of `any_`; [full_lo, full_hi) is the span of `all_` when that
    span is entirely True (it always is for causal / window / sorted segments), else empty.
    """
    def span(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        n = x.shape[-1]
        has = x.any(-1)
        lo = jnp.where(has, jnp.argmax(x, axis=-1), 0)
        hi = jnp.where(has, n - jnp.argmax(x[..., ::-1], axis=-1), 0)
        return lo, hi

    lo, hi = span(any_)
    full_lo, full_hi = span(all_)
    usable = (all_.sum(-1) == full_hi - full_lo) & (full_hi > full_lo)
    full_lo, full_hi = jnp.where(usable, full_lo, lo), jnp.where(usable, full_hi, lo)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=1).astype(jnp.int32)
