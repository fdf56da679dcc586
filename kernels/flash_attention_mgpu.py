"""Hopper flash-attention forward on Mosaic GPU (TMA loads, wgmma, warp-specialised pipeline),
and the tiles of the Mosaic kernels (`MosaicBlockSizes`).

One CTA owns 2 * block_q query rows of one (batch, head): two compute warpgroups (block_q rows
each, scores and output accumulated in registers by wgmma) and one producer warpgroup that streams
K/V blocks into a ring of `num_stages` shared-memory slots with TMA. Both compute warpgroups read
every K/V slot, then release it (a barrier with two arrivals) so the producer can refill it.
The two compute warpgroups take turns on the tensor cores (FA3's ping-pong schedule: one's
softmax runs while the other's matmuls do), and CTAs take the query tiles last-first (under a
causal mask the heaviest first, so the grid's tail is short).

Inputs are padded by `flash_attention.py`: q [B, Tq, H, D] with Tq % (2 * block_q) == 0;
k, v [B, Tk, Hkv, D] with Tk % block_kv == 0; D % 64 == 0; bf16 or fp16.
ranges [B, 4, Tq / (2 * block_q)] int32: (lo, full_lo, full_hi, hi) K/V blocks per CTA, as in the
Triton kernels (`attention_mask.visit_ranges`: blocks outside [lo, hi) are never loaded;
[full_lo, full_hi) skip the mask).
q_seg [B, Tq], kv_seg [B, Tk] int32 or None: segment ids, compared on masked blocks only (the
wrapper proves the others uniform).
Outputs: o [B, Tq, H, D] (q's dtype) and lse [B, H, Tq] float32 (natural log; +inf for a row that
sees no key), the residual the backward kernels (Mosaic or Triton) consume.
Also home of the helpers the backward kernels share: `stream` (the producer loop),
`mask_scores`, `mma_accumulate`, `load_vector`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.attention_mask import MaskSpec
from fastlora_jax.kernels.mgpu_profile import compiler_params
from fastlora_jax.ops import defaults

LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """Tiles of the Mosaic GPU kernels: block_q query rows (forward, dq) and block_kv keys (dk/dv)
    per compute warpgroup, two warpgroups per CTA; the other operand streamed in blocks of
    block_kv keys (forward, dq) / block_q rows (dk/dv) through a TMA ring of num_stages slots.
    *_bwd: the backward kernels'. Blocks are multiples of 64; stages >= 1. profile_dir: Mosaic
    GPU's in-kernel profiler writes a trace of the kernels' named regions per launch there ("" =
    off; benchmarks/mgpu_trace.py summarises them). `for_head_dim` gives the measured defaults
    (ops/defaults.py).
    """

    block_q: int
    block_kv: int
    num_stages: int
    block_q_bwd: int
    block_kv_bwd: int
    num_stages_bwd: int
    profile_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 64:
                raise KernelError(f"MosaicBlockSizes.{name}={value!r} must be a positive "
                                  f"multiple of 64")
        for name in ("num_stages", "num_stages_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KernelError(f"MosaicBlockSizes.{name}={value!r} must be an int >= 1")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> MosaicBlockSizes:
        """The measured tiles for this head_dim (up to 256)."""
        return cls(**defaults.up_to(defaults.MOSAIC_ATTENTION_BLOCKS, head_dim))


def mosaic_forward_supports(head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether this forward takes the call (otherwise the Triton kernel runs)."""
    return (head_dim % 64 == 0 and head_dim <= 256
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def load_vector(ref, layout) -> jax.Array:
    """A row/column vector straight from GMEM (plain loads: the swizzled fast path is for SMEM
    only); issue it early so its latency hides behind the next wgmma."""
    return plgpu.load(ref, layout=layout, optimized=False)


def row_vector(value: float, n: int) -> jax.Array:
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def mask_scores(spec: MaskSpec, s: jax.Array, q0: jax.Array, k0: jax.Array,
                transposed: bool = False,
                segments: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """s with invisible pairs set to -inf. s is [queries, keys] ([keys, queries] if transposed);
    q0 / k0: the first query row / key index of the tile; segments: the tile's (query, key)
    segment-id vectors, in the row/column layouts of s."""
    shape = s.shape
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    rows = plgpu.broadcasted_iota(jnp.int32, shape, q_axis, layout=plgpu.Layout.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, k_axis, layout=plgpu.Layout.WGMMA)
    pos = rows + (q0 + spec.offset)
    cols = cols + k0
    mask = None
    if spec.kv_padded:
        mask = cols < spec.seq_kv
    if spec.causal:
        c = cols <= pos
        mask = c if mask is None else mask & c
    if spec.sliding_window is not None:
        c = cols > pos - spec.sliding_window
        mask = c if mask is None else mask & c
    if segments is not None:
        q_seg, k_seg = segments
        c = (lax.broadcast_in_dim(q_seg, shape, [q_axis])
             == lax.broadcast_in_dim(k_seg, shape, [k_axis]))
        mask = c if mask is None else mask & c
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def stream(n: jax.Array, num_stages: int, copies: list) -> None:
    """Producer warpgroup: for t in [0, n) copy block t of every source into ring slot
    t % num_stages, waiting until the consumers have freed the slot.

    copies: (src(t) -> GMEM view, SMEM ring [num_stages, ...], loaded barriers, freed barriers).
    The last num_stages releases are observed too, so every barrier ends on a completed phase.
    """
    @jax.named_scope("issue_tma")
    def load(t, slot):
        for src, ring, loaded, _ in copies:
            plgpu.copy_gmem_to_smem(src(t), ring.at[slot], loaded.at[slot])

    @jax.named_scope("wait_free")
    def wait_free(slot):
        for _, _, _, freed in copies:
            plgpu.barrier_wait(freed.at[slot])

    for slot in range(num_stages):
        pl.when(slot < n)(functools.partial(load, slot, slot))

    @pl.loop(0, jnp.maximum(n - num_stages, 0))
    def _refill(t):
        slot = lax.rem(t, num_stages)
        wait_free(slot)
        load(t + num_stages, slot)

    @pl.loop(jnp.maximum(n - num_stages, 0), n)
    def _drain(t):
        wait_free(lax.rem(t, num_stages))


def mma_accumulate(acc: jax.Array, a: jax.Array, b_smem, a_smem) -> jax.Array:
    """acc + a @ b: wgmma with A from registers, accumulating in place.

    a_smem is None on the GPU. The interpreter takes wgmma operands from shared memory only and
    has no `run_state`: there `a` goes through a_smem and the product to a fresh accumulator.
    """
    if a_smem is None:
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a, b_smem)

        return pl.run_state(mma)(plgpu.ACC.init(acc))

    a_smem[...] = a

    def fresh(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))


def mosaic_forward(q: jax.Array, k: jax.Array, v: jax.Array, ranges: jax.Array,
                   q_seg: jax.Array | None, kv_seg: jax.Array | None, *, spec: MaskSpec,
                   scale: float, softcap: float | None, blocks: MosaicBlockSizes,
                   interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Padded forward: (o [B, Tq, H, D], lse [B, H, Tq] float32). q_seg [B, Tq], kv_seg [B, Tk]
    int32 or None (segment ids padded with -1 / -2).

    Ping-pong: a two-arrival barrier makes one warpgroup's softmax run while the other's matmuls
    do. Both warpgroups of a CTA visit the same key blocks, so their rendezvous counts match: per
    step one after issuing q k^T and one before p v; warpgroup 1 adds one at the start, warpgroup
    0 one at the end. Off under the interpreter (its threads are not scheduled like warpgroups).
    Reverse tiles: CTA i takes query tile n_tiles - 1 - i."""
    block_q, block_kv, num_stages = blocks.block_q, blocks.block_kv, blocks.num_stages
    pingpong = not interpret
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    cta_rows = _COMPUTE_WGS * block_q
    n_tiles = seq_q // cta_rows
    dtype = q.dtype

    def compute(q_ref, k_ref, v_ref, o_ref, lse_ref, ranges_ref, seg_refs, q_smem, lse_smem,
                k_smem, v_smem, p_smem, q_bar, k_bar, v_bar, k_free, v_free, turn, wg, b, h,
                tile):
        plgpu.set_max_registers(232, action="increase")

        def rendezvous():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        row0 = tile * cta_rows + wg * block_q
        rows = (b, pl.ds(row0, block_q), h)
        lo, full_lo, full_hi, hi = (ranges_ref[b, r, tile] for r in range(4))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_bar)
        if seg_refs:
            q_seg_vec = load_vector(seg_refs[0].at[b, pl.ds(row0, block_q)],
                                    plgpu.Layout.WGMMA.reduce(1))
        plgpu.barrier_wait(q_bar)

        def step(t, carry, masked: bool):
            acc, m, l = carry
            slot = lax.rem(t, num_stages)
            segments = None
            if masked and seg_refs:
                k_seg_vec = load_vector(seg_refs[1].at[b, pl.ds((lo + t) * block_kv, block_kv)],
                                        plgpu.Layout.WGMMA.reduce(0))
                segments = (q_seg_vec, k_seg_vec)
            with jax.named_scope("wait_k"):
                plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                if pingpong:  # let the other warpgroup's softmax finish before ours starts
                    rendezvous()
                return acc_ref[...]

            with jax.named_scope("qk"):
                s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            # s2 = log2(e) * (scaled, soft-capped score): softmax runs in base 2.
            with jax.named_scope("softmax"):
                if softcap is None:
                    s2 = s * (scale * LOG2E)
                else:
                    s2 = jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E)
                if masked:
                    s2 = mask_scores(spec, s2, row0, (lo + t) * block_kv, segments=segments)
                m_new = jnp.maximum(m, s2.max(axis=1))
                if masked:  # a row that has seen no key yet keeps m = -inf: shift by 0 instead
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                else:
                    m_use = m_new
                p = jnp.exp2(s2 - lax.broadcast_in_dim(m_use, s2.shape, [0]))
                alpha = jnp.exp2(m - m_use)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
            with jax.named_scope("wait_v"):
                if pingpong:  # softmax done; take the tensor cores once the other one is done too
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(turn)
                else:
                    plgpu.barrier_wait(v_bar.at[slot])
            with jax.named_scope("pv"):
                acc = mma_accumulate(acc, p16, v_smem.at[slot], p_smem)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = (plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32),
                                   plgpu.Layout.WGMMA),
                 row_vector(-jnp.inf, block_q), row_vector(0.0, block_q))
        if pingpong:
            pl.when(wg == 1)(rendezvous)
        carry = lax.fori_loop(0, full_lo - lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(full_lo - lo, full_hi - lo, functools.partial(step, masked=False),
                              carry)
        acc, m, l = lax.fori_loop(full_hi - lo, hi - lo, functools.partial(step, masked=True),
                                  carry)
        if pingpong:
            pl.when(wg == 0)(rendezvous)
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)
        lse_smem[...] = jnp.where(empty, jnp.inf, m * _LN2 + jnp.log(l_safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(row0, block_q)])
        plgpu.wait_smem_to_gmem(0)

    def produce(k_ref, v_ref, ranges_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, b, h,
                tile):
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, jnp.array(group, h.dtype))
        lo, hi = ranges_ref[b, 0, tile], ranges_ref[b, 3, tile]
        cols = lambda t: (b, pl.ds((lo + t) * block_kv, block_kv), kv_head)
        stream(hi - lo, num_stages, [(lambda t: k_ref.at[cols(t)], k_smem, k_bar, k_free),
                                     (lambda t: v_ref.at[cols(t)], v_smem, v_bar, v_free)])

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, ranges_ref, seg_refs, scratch):
        ((q_smem2, lse_smem2, k_smem, v_smem, *p_smem2), (q_bar, k_bar, v_bar), (k_free, v_free),
         turn) = scratch
        b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles")
        tile = n_tiles - 1 - tile
        wg = lax.axis_index("wg")

        @pl.when(wg < _COMPUTE_WGS)
        def _compute():
            compute(q_ref, k_ref, v_ref, o_ref, lse_ref, ranges_ref, seg_refs, q_smem2.at[wg],
                    lse_smem2.at[wg], k_smem, v_smem, p_smem2[0].at[wg] if p_smem2 else None,
                    q_bar.at[wg], k_bar, v_bar, k_free, v_free, turn, wg, b, h, tile)

        @pl.when(wg == _COMPUTE_WGS)
        def _produce():
            produce(k_ref, v_ref, ranges_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, b, h,
                    tile)

    segs = () if q_seg is None else (q_seg, kv_seg)

    def entry(q_ref, k_ref, v_ref, ranges_ref, *refs):
        *seg_refs, o_ref, lse_ref = refs
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (plgpu.SMEM((_COMPUTE_WGS, block_q, head_dim), dtype, transforms=transforms),
                plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
                plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=transforms),
                plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=transforms))
        if interpret:  # P staged through shared memory (see mma_accumulate)
            smem += (plgpu.SMEM((_COMPUTE_WGS, block_q, block_kv), dtype, transforms=transforms),)
        loaded = (plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=num_stages),
                  plgpu.Barrier(num_barriers=num_stages))
        freed = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=num_stages),) * 2
        turn = plgpu.Barrier(num_arrivals=_COMPUTE_WGS)  # pingpong's rendezvous
        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, o_ref, lse_ref, ranges_ref, seg_refs,
                                  scratch),
            smem, loaded, freed, turn, collective_axes="wg")

    extra = dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}
    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)),
        grid=(heads, n_tiles, batch),
        grid_names=("heads", "tiles", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=compiler_params(blocks.profile_dir, approx_math=True),
        **extra,
    )(q, k, v, ranges, *segs)
