"""Hopper flash-attention backward on Mosaic GPU: a dq kernel and a dk/dv kernel.

Both follow the forward's layout (`flash_attention_mgpu.py`): two compute warpgroups per CTA own
block rows that stay in shared memory, and a producer warpgroup streams the other operand's blocks
through a TMA ring. Scores are recomputed from q, k and the forward's lse; with
p = exp(s - lse), dp = do v^T, ds = p (dp - delta) (times 1 - tanh^2 under softcap):
  dq = scale * ds k                      (grid over query tiles, K/V streamed)
  dk = scale * ds^T q,  dv = p^T do      (grid over key tiles and kv heads: each CTA streams
                                          the Q/dO blocks of every query head of its group and
                                          sums dk/dv over the group in registers)
The dq kernel takes its query tiles last-first, as the forward does.
Inputs padded as for the forward: q, do [B, Tq, H, D]; k, v [B, Tk, Hkv, D]; lse, delta
[B, H, Tq] float32 (lse = +inf and delta = 0 on padded rows); D in {64, 128}; bf16 or fp16.
ranges: dq [B, 4, Tq / (2 block_q)] over key blocks; dkv [B, 4, Tk / (2 block_kv)] over query
blocks (lo, full_lo, full_hi, hi as `attention_mask.visit_ranges` gives them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fastlora_jax.kernels.attention_mask import MaskSpec
from fastlora_jax.kernels.flash_attention_mgpu import (LOG2E, MosaicBlockSizes, load_vector,
                                                       mask_scores, mma_accumulate, stream)
from fastlora_jax.kernels.mgpu_profile import compiler_params

_WGS = 2  # compute warpgroups per CTA


def mosaic_backward_supports(head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether these kernels take the call (shared memory limits head_dim to 128; otherwise the
    Triton backward runs)."""
    return (head_dim in (64, 128)
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def scores2(s: jax.Array, scale: float, softcap: float | None
            ) -> tuple[jax.Array, jax.Array | None]:
    """log2(e) * (scaled, soft-capped) scores, and tanh for the softcap gradient."""
    if softcap is None:
        return s * (scale * LOG2E), None
    t = jnp.tanh(s * (scale / softcap))
    return t * (softcap * LOG2E), t


@jax.named_scope("ds")
def score_grads(p: jax.Array, dp: jax.Array, delta: jax.Array, th: jax.Array | None,
                query_axis: int) -> jax.Array:
    """ds = p (dp - delta), times 1 - tanh^2 under a softcap; delta (one per query) broadcast
    along the scores' query axis (0 for [queries, keys], 1 for transposed scores)."""
    ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [query_axis]))
    return ds if th is None else ds * (1.0 - th * th)


def _smem_specs(dtype, shapes: list[tuple[int, ...]]) -> tuple:
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return tuple(plgpu.SMEM(shape, dtype, transforms=transforms) for shape in shapes)


def _interpret_kw(interpret: bool) -> dict:
    return dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}


def stream_query_blocks(b: jax.Array, first_head: jax.Array, n_heads: int, lo: jax.Array,
                        hi: jax.Array, block_q: int, num_stages: int, rows: list) -> None:
    """Producer warpgroup of the dk/dv kernel: step i streams query block lo + i % (hi - lo) of
    query head first_head + i // (hi - lo), for n_heads heads.

    rows: (ref [B, Tq, H, D], ring, loaded, freed) per source (q, do).
    """
    n = jnp.maximum(hi - lo, 1)

    def where(i):
        return first_head + lax.div(i, n), pl.ds((lo + lax.rem(i, n)) * block_q, block_q)

    def row_src(ref):
        def src(i):
            head, rows = where(i)
            return ref.at[b, rows, head]
        return src

    stream(n_heads * (hi - lo), num_stages, [(row_src(ref), *rest) for ref, *rest in rows])


def load_key_block(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, seg_refs, b: jax.Array,
                   key0: jax.Array, kv_head: jax.Array, block_kv: int) -> jax.Array | None:
    """A key-owning warpgroup's resident k / v block (TMA into shared memory, awaited) and its
    key segment-id vector (None without segment ids)."""
    keys = (b, pl.ds(key0, block_kv), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_bar)
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, v_bar)
    plgpu.barrier_wait(k_bar)
    plgpu.barrier_wait(v_bar)
    if not seg_refs:
        return None
    return load_vector(seg_refs[1].at[b, pl.ds(key0, block_kv)], plgpu.Layout.WGMMA.reduce(1))


def query_block_inputs(lse_ref, delta_ref, seg_refs, k_seg_vec, b: jax.Array, head: jax.Array,
                       q0: jax.Array, block_q: int, layout,
                       masked: bool) -> tuple[jax.Array, jax.Array, tuple | None]:
    """(lse * log2(e), delta, segments) of the query block at q0 of `head`, as the dk/dv kernel
    needs them per step (from global memory); the (query, key) segment-id vectors on masked
    steps with segment ids."""
    lse2 = load_vector(lse_ref.at[b, head, pl.ds(q0, block_q)], layout) * LOG2E
    delta = load_vector(delta_ref.at[b, head, pl.ds(q0, block_q)], layout)
    segments = None
    if masked and seg_refs:
        segments = (load_vector(seg_refs[0].at[b, pl.ds(q0, block_q)], layout), k_seg_vec)
    return lse2, delta, segments


def mosaic_dq(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
              delta: jax.Array, ranges: jax.Array, q_seg: jax.Array | None,
              kv_seg: jax.Array | None, *, spec: MaskSpec, scale: float, softcap: float | None,
              blocks: MosaicBlockSizes, interpret: bool) -> jax.Array:
    """dq [B, Tq, H, D] in q's dtype; CTA i takes query tile n - 1 - i (the heaviest tiles under
    a causal mask first, as in the forward)."""
    block_q, block_kv = blocks.block_q_bwd, blocks.block_kv_bwd
    num_stages = blocks.num_stages_bwd
    batch, seq_q, heads, d = q.shape
    group = heads // k.shape[2]
    dtype = q.dtype
    cta_rows = _WGS * block_q
    n_tiles = seq_q // cta_rows

    def compute(q_ref, do_ref, lse_ref, delta_ref, dq_ref, ranges_ref, seg_refs, q_smem, do_smem,
                k_ring,
                v_ring, ds_smem, q_bar, do_bar, k_bar, v_bar, k_free, v_free, wg, b, h, tile):
        plgpu.set_max_registers(232, action="increase")
        row0 = tile * cta_rows + wg * block_q
        rows = (b, pl.ds(row0, block_q), h)
        lo, full_lo, full_hi, hi = (ranges_ref[b, r, tile] for r in range(4))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_bar)
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_bar)
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        lse2 = load_vector(lse_ref.at[b, h, pl.ds(row0, block_q)], row_layout) * LOG2E
        delta = load_vector(delta_ref.at[b, h, pl.ds(row0, block_q)], row_layout)
        if seg_refs:
            q_seg_vec = load_vector(seg_refs[0].at[b, pl.ds(row0, block_q)], row_layout)
        plgpu.barrier_wait(q_bar)
        plgpu.barrier_wait(do_bar)
        shape = (block_q, block_kv)

        def step(t, dq, masked: bool):
            slot = lax.rem(t, num_stages)
            segments = None
            if masked and seg_refs:
                k_seg_vec = load_vector(seg_refs[1].at[b, pl.ds((lo + t) * block_kv, block_kv)],
                                        plgpu.Layout.WGMMA.reduce(0))
                segments = (q_seg_vec, k_seg_vec)
            with jax.named_scope("wait_k"):
                plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
                return acc_ref[...]

            with jax.named_scope("qk"):
                s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))

            with jax.named_scope("probs"):
                s2, th = scores2(s, scale, softcap)
                if masked:
                    s2 = mask_scores(spec, s2, row0, (lo + t) * block_kv, segments=segments)
                p = jnp.exp2(s2 - lax.broadcast_in_dim(lse2, shape, [0]))
            with jax.named_scope("wait_v"):
                plgpu.barrier_wait(v_bar.at[slot])

            def dov(acc_ref):
                plgpu.wgmma(acc_ref, do_smem, v_ring.at[slot].transpose((1, 0)))
                return acc_ref[...]

            with jax.named_scope("dov"):
                dp = pl.run_scoped(dov, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            ds = score_grads(p, dp, delta, th, query_axis=0)
            with jax.named_scope("dq"):
                dq = mma_accumulate(dq, ds.astype(dtype), k_ring.at[slot], ds_smem)
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
        dq = lax.fori_loop(0, full_lo - lo, functools.partial(step, masked=True), dq)
        dq = lax.fori_loop(full_lo - lo, full_hi - lo, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(full_hi - lo, hi - lo, functools.partial(step, masked=True), dq)
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, seg_refs, dq_ref,
             scratch):
        (q2, do2, k_ring, v_ring, *ds2), (q_bar, do_bar, k_bar, v_bar), (k_free, v_free) = scratch
        b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles")
        tile = n_tiles - 1 - tile
        wg = lax.axis_index("wg")

        @pl.when(wg < _WGS)
        def _compute():
            compute(q_ref, do_ref, lse_ref, delta_ref, dq_ref, ranges_ref, seg_refs, q2.at[wg],
                    do2.at[wg],
                    k_ring, v_ring, ds2[0].at[wg] if ds2 else None, q_bar.at[wg], do_bar.at[wg],
                    k_bar, v_bar, k_free, v_free, wg, b, h, tile)

        @pl.when(wg == _WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(h, jnp.array(group, h.dtype))
            lo, hi = ranges_ref[b, 0, tile], ranges_ref[b, 3, tile]
            cols = lambda t: (b, pl.ds((lo + t) * block_kv, block_kv), kv_head)
            stream(hi - lo, num_stages, [(lambda t: k_ref.at[cols(t)], k_ring, k_bar, k_free),
                                         (lambda t: v_ref.at[cols(t)], v_ring, v_bar, v_free)])

    segs = () if q_seg is None else (q_seg, kv_seg)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, *refs):
        *seg_refs, dq_ref = refs
        shapes = [(_WGS, block_q, d)] * 2 + [(num_stages, block_kv, d)] * 2
        if interpret:  # dS staged through shared memory (see mma_accumulate)
            shapes.append((_WGS, block_q, block_kv))
        loaded = (plgpu.Barrier(num_barriers=_WGS), plgpu.Barrier(num_barriers=_WGS),
                  plgpu.Barrier(num_barriers=num_stages), plgpu.Barrier(num_barriers=num_stages))
        freed = (plgpu.Barrier(num_arrivals=_WGS, num_barriers=num_stages),) * 2
        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref,
                                  seg_refs, dq_ref, scratch),
            _smem_specs(q.dtype, shapes), loaded, freed, collective_axes="wg")

    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(heads, n_tiles, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=_WGS + 1, thread_name="wg",
        compiler_params=compiler_params(blocks.profile_dir, approx_math=True),
        **_interpret_kw(interpret),
    )(q, k, v, do, lse, delta, ranges, *segs)


def mosaic_dkv(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
               delta: jax.Array, ranges: jax.Array, q_seg: jax.Array | None,
               kv_seg: jax.Array | None, *, spec: MaskSpec, scale: float, softcap: float | None,
               blocks: MosaicBlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """dk, dv [B, Tk, Hkv, D] in q's dtype. One CTA per (key tile, kv head) streams the (q, do)
    blocks of every query head of its group and sums dk/dv in registers: no per-query-head
    buffer and no group sum after the kernel."""
    block_q, block_kv = blocks.block_q_bwd, blocks.block_kv_bwd
    num_stages = blocks.num_stages_bwd
    batch, seq_q, heads, d = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    cta_keys = _WGS * block_kv

    def compute(k_ref, v_ref, lse_ref, delta_ref, dk_ref, dv_ref, ranges_ref, seg_refs, k_smem,
                v_smem, q_ring, do_ring, p_smem, k_bar, v_bar, q_bar, do_bar, q_free, do_free,
                wg, b, h, tile):
        plgpu.set_max_registers(232, action="increase")
        key0 = tile * cta_keys + wg * block_kv
        kv_head = h
        lo, full_lo, full_hi, hi = (ranges_ref[b, r, tile] for r in range(4))
        n = hi - lo  # query blocks visited per query head
        k_seg_vec = load_key_block(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, seg_refs, b, key0,
                                   kv_head, block_kv)
        shape = (block_kv, block_q)  # transposed scores: keys x queries
        col_layout = plgpu.Layout.WGMMA.reduce(0)

        def step(t, carry, masked: bool, g):
            dk, dv = carry
            qh = kv_head * group + g  # the query head of this step
            slot = lax.rem(g * n + t, num_stages)  # the ring runs on across the group's heads
            q0 = (lo + t) * block_q
            lse2, delta, segments = query_block_inputs(
                lse_ref, delta_ref, seg_refs, k_seg_vec, b, qh, q0, block_q, col_layout, masked)
            with jax.named_scope("wait_q"):
                plgpu.barrier_wait(q_bar.at[slot])

            def kq(acc_ref):
                plgpu.wgmma(acc_ref, k_smem, q_ring.at[slot].transpose((1, 0)))
                return acc_ref[...]

            with jax.named_scope("kq"):
                s = pl.run_scoped(kq, plgpu.ACC(shape, jnp.float32))

            def vdo(acc_ref):
                plgpu.wgmma(acc_ref, v_smem, do_ring.at[slot].transpose((1, 0)))
                return acc_ref[...]

            with jax.named_scope("probs"):
                s2, th = scores2(s, scale, softcap)
                if masked:
                    s2 = mask_scores(spec, s2, q0, key0, transposed=True, segments=segments)
                p = jnp.exp2(s2 - lax.broadcast_in_dim(lse2, shape, [1]))
            with jax.named_scope("wait_do"):
                plgpu.barrier_wait(do_bar.at[slot])
            with jax.named_scope("dv"):
                dv = mma_accumulate(dv, p.astype(dtype), do_ring.at[slot], p_smem)
            with jax.named_scope("vdo"):
                dp = pl.run_scoped(vdo, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(do_free.at[slot])
            ds = score_grads(p, dp, delta, th, query_axis=1)
            with jax.named_scope("dk"):
                dk = mma_accumulate(dk, ds.astype(dtype), q_ring.at[slot], p_smem)
            plgpu.barrier_arrive(q_free.at[slot])
            return dk, dv

        def head(g, carry):
            carry = lax.fori_loop(0, full_lo - lo, functools.partial(step, masked=True, g=g),
                                  carry)
            carry = lax.fori_loop(full_lo - lo, full_hi - lo,
                                  functools.partial(step, masked=False, g=g), carry)
            return lax.fori_loop(full_hi - lo, n, functools.partial(step, masked=True, g=g),
                                 carry)

        zeros = plgpu.layout_cast(jnp.zeros((block_kv, d), jnp.float32), plgpu.Layout.WGMMA)
        dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        out = (b, pl.ds(key0, block_kv), h)
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[out])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[out])
        plgpu.wait_smem_to_gmem(0)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, seg_refs, dk_ref, dv_ref,
             scratch):
        (k2, v2, q_ring, do_ring, *p2), (k_bar, v_bar, q_bar, do_bar), (q_free, do_free) = scratch
        b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles")
        wg = lax.axis_index("wg")

        @pl.when(wg < _WGS)
        def _compute():
            compute(k_ref, v_ref, lse_ref, delta_ref, dk_ref, dv_ref, ranges_ref, seg_refs,
                    k2.at[wg],
                    v2.at[wg], q_ring, do_ring, p2[0].at[wg] if p2 else None, k_bar.at[wg],
                    v_bar.at[wg], q_bar, do_bar, q_free, do_free, wg, b, h, tile)

        @pl.when(wg == _WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            lo, hi = ranges_ref[b, 0, tile], ranges_ref[b, 3, tile]
            stream_query_blocks(b, h * group, group, lo, hi, block_q, num_stages,
                                [(q_ref, q_ring, q_bar, q_free),
                                 (do_ref, do_ring, do_bar, do_free)])

    segs = () if q_seg is None else (q_seg, kv_seg)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, *refs):
        *seg_refs, dk_ref, dv_ref = refs
        shapes = [(_WGS, block_kv, d)] * 2 + [(num_stages, block_q, d)] * 2
        if interpret:  # P and dS staged through shared memory (see mma_accumulate)
            shapes.append((_WGS, block_kv, block_q))
        loaded = (plgpu.Barrier(num_barriers=_WGS), plgpu.Barrier(num_barriers=_WGS),
                  plgpu.Barrier(num_barriers=num_stages), plgpu.Barrier(num_barriers=num_stages))
        freed = (plgpu.Barrier(num_arrivals=_WGS, num_barriers=num_stages),) * 2
        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref,
                                  seg_refs, dk_ref, dv_ref, scratch),
            _smem_specs(dtype, shapes), loaded, freed, collective_axes="wg")

    per_head = jax.ShapeDtypeStruct((batch, seq_kv, kv_heads, d), dtype)
    return plgpu.kernel(
        entry, out_type=(per_head, per_head),
        grid=(kv_heads, seq_kv // cta_keys, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=_WGS + 1, thread_name="wg",
        compiler_params=compiler_params(blocks.profile_dir, approx_math=True),
        **_interpret_kw(interpret),
    )(q, k, v, do, lse, delta, ranges, *segs)
