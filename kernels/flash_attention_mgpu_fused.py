"""Hopper flash-attention backward on Mosaic GPU in one kernel; dq reduce-added by TMA.

The two-kernel backward (`flash_attention_mgpu_bwd.py`) recomputes q k^T and do v^T in its dq
kernel: 7 matmuls per visible (query block, key block) pair. Here one CTA owns 2 * block_kv keys
of one (batch, kv head) -- block_kv per compute warpgroup, resident in shared memory -- and a
producer warpgroup streams the (q, do) blocks of every query head of the GQA group through a TMA
ring. Per visible pair, each compute warpgroup does the 5 matmuls the FLOP count credits:
  s^T  = k q^T                (SS)      p^T = exp(s^T - lse)
  dv  += p^T do               (RS)
  dp^T = v do^T               (SS)      ds^T = p^T (dp^T - delta)  (x (1 - tanh^2) under softcap)
  dk  += ds^T q               (SS: ds^T is staged in shared memory for the next product anyway)
  dq_part = (ds^T)^T k        (SS, A transposed)
and hands dq_part (float32) to the TMA engine with a reduce-add into a zero-initialised float32
dq in global memory (`copy_smem_to_gmem(..., reduction_op="add")`): the CTAs that share a query
block sum there, in any order (float32 addition order varies run to run in the last bits).
dk/dv accumulate over the whole group in registers and are written once, per kv head (no
per-query-head buffer, no group sum afterwards). Whole dq (D columns) per product when shared
memory allows, else two 64-column halves (head_dim 128 with a 3-stage ring). pair_dq (head_dim
128): the two warpgroups sync on two barriers per pair and form one product over both key blocks
(K = 2 * block_kv), each adding half the columns -- half the reduce-add traffic.

Interpreter (CPU tests): Mosaic GPU's interpreter raises NotImplementedError for a reduce-add
copy, so under `interpret` -- and only there -- that single step is emulated: the same TMA store
without the reduction, into a zero-initialised float32 dq_parts [key tiles, 2, B, Tq, H, D] where
every (key tile, warpgroup) has its own slot (it visits each (query block, head) at most once, so
nothing is overwritten and no two threads share an address: race-free by construction, also for
the interpreter's race detector); the slots are summed outside. That costs key tiles x dq memory,
fine for test shapes. Everything else (TMA ring, masks, block skipping, GQA loop, wgmma operands,
barriers) is the GPU code.

Inputs padded as for the other Mosaic kernels: q, do [B, Tq, H, D]; k, v [B, Tk, Hkv, D];
Tq % block_q == 0, Tk % (2 * block_kv) == 0; lse, delta [B, H, Tq] float32 (lse = +inf, delta = 0
on padded query rows); D in {64, 128}; bf16 or fp16. ranges [B, 4, Tk / (2 block_kv)] int32 over
query blocks (lo, full_lo, full_hi, hi, as in the other kernels). q_seg [B, Tq], kv_seg [B, Tk]
int32 or None.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.flash_attention_mgpu import mask_scores
from fastlora_jax.kernels.flash_attention_mgpu_bwd import (load_key_block, query_block_inputs,
                                                           score_grads, scores2, stats_scratch,
                                                           stats_stream_sources,
                                                           stream_query_blocks)
from fastlora_jax.kernels.flash_attention_portable import MaskSpec
from fastlora_jax.kernels.mgpu_profile import compiler_params

_WGS = 2  # compute warpgroups per CTA
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a Hopper CTA may use


def supported(head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether the fused kernel handles the call (shared memory limits head_dim to 128)."""
    return (head_dim in (64, 128)
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def smem_bytes(head_dim: int, block_q: int, block_kv: int, num_stages: int,
               dq_cols: int | None = None, itemsize: int = 2) -> int:
    """Shared memory one CTA needs on the GPU (Hopper allows 227 KiB per CTA)."""
    resident = 2 * _WGS * block_kv * head_dim * itemsize      # k, v per warpgroup
    ring = 2 * num_stages * block_q * head_dim * itemsize      # q, do slots
    ds = _WGS * block_kv * block_q * itemsize                  # ds^T staging
    dq = _WGS * block_q * (dq_cols or head_dim) * 4            # float32 dq staging
    stats = 2 * num_stages * block_q * 4                       # lse / delta ring (stats_tma)
    return resident + ring + ds + dq + stats


def dq_columns(head_dim: int, block_q: int, block_kv: int, num_stages: int) -> int:
    """Columns of dq computed and reduce-added at a time: all of them when shared memory allows,
    else 64 (a smaller float32 staging buffer, one more wgmma + TMA per pair)."""
    if smem_bytes(head_dim, block_q, block_kv, num_stages) <= SMEM_LIMIT:
        return head_dim
    return 64


def _mma(acc: jax.Array | None, a, b, *, interpret: bool) -> jax.Array:
    """acc + a @ b with both operands in shared memory (acc None: a fresh product).

    On the GPU the product accumulates in place (`run_state`); the interpreter has no run_state,
    so there the product goes to a fresh accumulator and is added.
    """
    def fresh(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    if acc is None or interpret:
        shape = (a.shape[0], b.shape[1])
        out = pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))
        return out if acc is None else acc + out

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _mma_regs(acc: jax.Array, a: jax.Array, b, a_smem, *, interpret: bool) -> jax.Array:
    """acc + a @ b with `a` in registers (RS wgmma); the interpreter stages `a` in a_smem."""
    if not interpret:
        def accumulate(acc_ref):
            plgpu.wgmma(acc_ref, a, b)

        return pl.run_state(accumulate)(plgpu.ACC.init(acc))
    a_smem[...] = a
    return _mma(acc, a_smem, b, interpret=True)


def backward_fused(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
                   delta: jax.Array, ranges: jax.Array, q_seg: jax.Array | None,
                   kv_seg: jax.Array | None, *, spec: MaskSpec, scale: float,
                   softcap: float | None, block_q: int, block_kv: int, num_stages: int,
                   pair_dq: bool = False, overlap: bool = False, stats_tma: bool = False,
                   interpret: bool | plgpu.InterpretGPUParams = False, profile_dir: str = ""
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq [B, Tq, H, D] in q's dtype, dk, dv [B, Tk, Hkv, D] in k's dtype).

    pair_dq: the two compute warpgroups form one dq product per query block over both key blocks
    (K = 2 * block_kv), each taking half of D's columns: half the reduce-add traffic, for two
    warpgroup barriers per block pair. head_dim 128 only (the halves must be 64-column tiles).
    overlap: issue v do^T before computing p^T (the exponentials run while the tensor cores form
    dp^T), then dv's product, and wait for both at once.
    stats_tma: lse and delta of each query block come through the producer's TMA ring instead
    of a global-memory load every step.
    interpret: True or the interpreter's parameters (e.g. detect_races=True) to run on the CPU.
    """
    batch, seq_q, heads, d = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    cta_keys = _WGS * block_kv
    if not supported(d, dtype):
        raise KernelError(f"fused Mosaic backward: head_dim={d} must be 64 or 128 and "
                          f"dtype={jnp.dtype(dtype).name} bfloat16/float16; use the two-kernel "
                          "backward (BlockSizes.mgpu_fused_bwd=False)")
    if seq_q % block_q or seq_kv % cta_keys:
        raise KernelError(f"fused Mosaic backward: padded seq_q={seq_q} must be a multiple of "
                          f"{block_q=} and seq_kv={seq_kv} of 2 * {block_kv=}")
    if pair_dq and d != 128:
        raise KernelError(f"fused Mosaic backward: mgpu_fused_pair_dq needs head_dim 128, got "
                          f"head_dim={d}; leave it False")
    dq_cols = d // 2 if pair_dq else dq_columns(d, block_q, block_kv, num_stages)
    need = smem_bytes(d, block_q, block_kv, num_stages, dq_cols)
    if not interpret and need > SMEM_LIMIT:
        raise KernelError(
            f"fused Mosaic backward needs {need} bytes of shared memory (> {SMEM_LIMIT}) at "
            f"head_dim={d}, mgpu_block_q_bwd={block_q}, mgpu_block_kv_bwd={block_kv}, "
            f"mgpu_num_stages_bwd={num_stages} (None: mgpu_num_stages); lower one of them")

    def compute(k_ref, v_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, ranges_ref, seg_refs,
                k_all, ds_all, v_smem, q_ring, do_ring, dq_smem, k_bar, v_bar, q_bar,
                do_bar, q_free, do_free, ds_ready, ds_read, stats, wg, b, kv_head, tile):
        k_smem, ds_smem = k_all.at[wg], ds_all.at[wg]  # this warpgroup's keys, its ds^T
        plgpu.set_max_registers(232, action="increase")
        key0 = tile * cta_keys + wg * block_kv
        keys = (b, pl.ds(key0, block_kv), kv_head)
        lo, full_lo, full_hi, hi = (ranges_ref[b, r, tile] for r in range(4))
        n = hi - lo  # query blocks visited per head
        k_seg_vec = load_key_block(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, seg_refs, b, key0,
                                   kv_head, block_kv)
        shape = (block_kv, block_q)  # transposed scores: keys x queries
        col_layout = plgpu.Layout.WGMMA.reduce(0)

        @jax.named_scope("dq_add")
        def add_dq(dq_part: jax.Array, h: jax.Array, q0: jax.Array, cols) -> None:
            """Reduce-add a [block_q, dq_cols] float32 partial dq into dq[b, q0:, h, cols]."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous add has read dq_smem
            dq_smem[...] = dq_part
            plgpu.commit_smem()
            rows = (b, pl.ds(q0, block_q), h, cols)
            if not interpret:
                plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[rows], reduction_op="add")
            else:  # emulated: a slot per (key tile, warpgroup), summed outside (module docstring)
                plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[(tile, wg) + rows])

        @jax.named_scope("dq_pair")
        def paired_dq(h: jax.Array, q0: jax.Array, cols) -> None:
            def product(acc_ref):
                for w in range(_WGS):
                    plgpu.wgmma(acc_ref, ds_all.at[w].transpose((1, 0)), k_all.at[w, :, cols])
                return acc_ref[...]

            add_dq(pl.run_scoped(product, plgpu.ACC((block_q, dq_cols), jnp.float32)), h, q0,
                   cols)

        def head(g, carry):
            h = kv_head * group + g

            def step(t, carry, masked: bool):
                dk, dv = carry
                slot = lax.rem(g * n + t, num_stages)  # the ring runs on across heads
                q0 = (lo + t) * block_q
                lse2, dlt, segments = query_block_inputs(
                    stats, slot, lse_ref, delta_ref, seg_refs, k_seg_vec, b, h, q0, block_q,
                    col_layout, masked)
                with jax.named_scope("wait_q"):
                    plgpu.barrier_wait(q_bar.at[slot])
                with jax.named_scope("kq"):
                    s = _mma(None, k_smem, q_ring.at[slot].transpose((1, 0)),
                             interpret=interpret)

                def probs():
                    s2, th = scores2(s, scale, softcap)
                    if masked:
                        s2 = mask_scores(spec, s2, q0, key0, transposed=True, segments=segments)
                    return jnp.exp2(s2 - lax.broadcast_in_dim(lse2, shape, [1])), th

                if overlap:
                    plgpu.barrier_wait(do_bar.at[slot])

                    def dp_then_dv(dp_ref):  # dp^T issued; p^T and dv's product meanwhile
                        plgpu.wgmma(dp_ref, v_smem, do_ring.at[slot].transpose((1, 0)))
                        p, th = probs()
                        dv_new = _mma_regs(dv, p.astype(dtype), do_ring.at[slot], ds_smem,
                                           interpret=interpret)
                        return p, th, dv_new, dp_ref[...]

                    with jax.named_scope("vdo+probs+dv"):
                        p, th, dv, dp = pl.run_scoped(dp_then_dv,
                                                      plgpu.ACC(shape, jnp.float32))
                else:
                    with jax.named_scope("probs"):
                        p, th = probs()
                    with jax.named_scope("wait_do"):
                        plgpu.barrier_wait(do_bar.at[slot])
                    with jax.named_scope("dv"):
                        dv = _mma_regs(dv, p.astype(dtype), do_ring.at[slot], ds_smem,
                                       interpret=interpret)
                    with jax.named_scope("vdo"):
                        dp = _mma(None, v_smem, do_ring.at[slot].transpose((1, 0)),
                                  interpret=interpret)
                plgpu.barrier_arrive(do_free.at[slot])
                ds = score_grads(p, dp, dlt, th, query_axis=1)
                with jax.named_scope("ds_store"):
                    ds_smem[...] = ds.astype(dtype)
                    plgpu.commit_smem()
                if pair_dq:
                    with jax.named_scope("wait_ds_ready"):
                        plgpu.barrier_arrive(ds_ready)  # both warpgroups' ds^T are in smem
                        plgpu.barrier_wait(ds_ready)
                with jax.named_scope("dk"):
                    dk = _mma(dk, ds_smem, q_ring.at[slot], interpret=interpret)
                plgpu.barrier_arrive(q_free.at[slot])
                if pair_dq:  # warpgroup w: dq[:, w-th half] = sum over both key blocks
                    for w in range(_WGS):
                        pl.when(wg == w)(functools.partial(paired_dq, h, q0,
                                                           pl.ds(w * dq_cols, dq_cols)))
                    with jax.named_scope("wait_ds_read"):
                        plgpu.barrier_arrive(ds_read)  # neither ds^T is overwritten before
                        plgpu.barrier_wait(ds_read)    # both warpgroups read it
                    return dk, dv
                for c in range(d // dq_cols):  # dq = ds k, dq_cols columns at a time
                    cols = pl.ds(c * dq_cols, dq_cols)
                    k_cols = k_smem if dq_cols == d else k_smem.at[:, cols]
                    with jax.named_scope("dq"):
                        dq_part = _mma(None, ds_smem.transpose((1, 0)), k_cols,
                                       interpret=interpret)
                    add_dq(dq_part, h, q0, cols)
                return dk, dv

            carry = lax.fori_loop(0, full_lo - lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(full_lo - lo, full_hi - lo,
                                  functools.partial(step, masked=False), carry)
            return lax.fori_loop(full_hi - lo, n, functools.partial(step, masked=True), carry)

        zeros = plgpu.layout_cast(jnp.zeros((block_kv, d), jnp.float32), plgpu.Layout.WGMMA)
        dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
        plgpu.wait_smem_to_gmem(0)  # also the last dq reduce-adds

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, seg_refs, dq_ref,
             dk_ref, dv_ref, scratch):
        (k2, v2, q_ring, do_ring, ds2), (dq2,), bars, (q_free, do_free, ds_ready, ds_read) = (
            scratch[:4])
        stats = scratch[4:]  # lse / delta rings, their loaded and freed barriers (stats_tma)
        k_bar, v_bar, q_bar, do_bar = bars
        b, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
        tile, wg = lax.axis_index("tiles"), lax.axis_index("wg")

        @pl.when(wg < _WGS)
        def _compute():
            compute(k_ref, v_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, ranges_ref,
                    seg_refs, k2, ds2, v2.at[wg], q_ring, do_ring, dq2.at[wg], k_bar.at[wg],
                    v_bar.at[wg], q_bar, do_bar, q_free, do_free, ds_ready,
                    ds_read, stats, wg, b, kv_head, tile)

        @pl.when(wg == _WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            lo, hi = ranges_ref[b, 0, tile], ranges_ref[b, 3, tile]
            stream_query_blocks(b, kv_head * group, group, lo, hi, block_q, num_stages,
                                [(q_ref, q_ring, q_bar, q_free),
                                 (do_ref, do_ring, do_bar, do_free)],
                                stats_stream_sources(lse_ref, delta_ref, stats))

    segs = () if q_seg is None else (q_seg, kv_seg)
    bf16_tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    f32_tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

    def flash_bwd_fused(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, *refs):
        *seg_refs, dq_ref, dk_ref, dv_ref = refs  # inputs (dq: the Ref), outputs
        smem16 = tuple(plgpu.SMEM(s, dtype, transforms=bf16_tiles) for s in
                       [(_WGS, block_kv, d)] * 2 + [(num_stages, block_q, d)] * 2
                       + [(_WGS, block_kv, block_q)])
        smem32 = (plgpu.SMEM((_WGS, block_q, dq_cols), jnp.float32, transforms=f32_tiles),)
        loaded = tuple(plgpu.Barrier(num_barriers=n) for n in (_WGS, _WGS, num_stages,
                                                               num_stages))
        freed = ((plgpu.Barrier(num_arrivals=_WGS, num_barriers=num_stages),) * 2
                 + (plgpu.Barrier(num_arrivals=_WGS),) * 2)  # + ds_ready, ds_read (pair_dq)
        stats = stats_scratch(num_stages, block_q) if stats_tma else ()
        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref,
                                  seg_refs, dq_ref, dk_ref, dv_ref, scratch),
            smem16, smem32, loaded, freed, *stats, collective_axes="wg")

    # dq accumulates in place: a zero-initialised float32 Ref the kernel reduce-adds into
    # (aliased input/output); the interpreter's emulation keeps a slot per (key tile, warpgroup).
    n_tiles = seq_kv // cta_keys
    dq_acc = jax.new_ref(jnp.zeros(((n_tiles, _WGS) if interpret else ()) + q.shape,
                                   jnp.float32))
    per_kv_head = jax.ShapeDtypeStruct(k.shape, dtype)
    dk, dv = plgpu.kernel(
        flash_bwd_fused, out_type=(per_kv_head, per_kv_head),
        grid=(kv_heads, n_tiles, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=_WGS + 1, thread_name="wg",
        compiler_params=compiler_params(profile_dir, approx_math=True),
        **(dict(interpret=interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                else plgpu.InterpretGPUParams()) if interpret else {}),
    )(q, k, v, do, lse, delta, ranges, *segs, dq_acc)
    dq = jax.freeze(dq_acc)
    if interpret:
        dq = dq.sum(axis=(0, 1))
    return (dq * scale).astype(dtype), dk, dv
