"""The fused Mosaic GPU backward (BlockSizes.mgpu_fused_bwd), interpreted on CPU, and its lowering.

The interpreter cannot execute a TMA reduce-add; under interpret only that step is emulated (the
same TMA store without the reduction, into one float32 slot per (key tile, warpgroup), summed
outside; see flash_attention_mgpu_fused.py), so these tests check the rest of the data flow:
masks, block skipping, the GQA head loop, the TMA ring, the paired-dq barriers, dk/dv per kv
head, and every partial dq landing in the right rows / heads / columns in float32. `test_lowers_for_gpu_with_tma_reduce_add` lowers the GPU
version (no interpret) for the CUDA platform and checks that the reduce-add is in the kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels import flash_attention as fa
from fastlora_jax.kernels import flash_attention_mgpu_fused as fused
from fastlora_jax.kernels.attention_reference import attention_mask, flash_attention_reference
from fastlora_jax.testing import attention_inputs, max_rel_error

FUSED_NAME = "flash_bwd_fused"  # the kernel's name, visible in jaxprs and lowered modules


def _blocks(head_dim: int, **kw) -> fa.BlockSizes:
    return dataclasses.replace(fa.BlockSizes.for_head_dim(head_dim), mgpu_fused_bwd=True, **kw)


def _grads(q, k, v, do, block_sizes: fa.BlockSizes, **kw):
    """(o, dq, dk, dv) through the Mosaic kernels, interpreted."""
    def loss(q, k, v):
        o = fa.flash_attention(q, k, v, block_sizes=block_sizes, backend="mosaic_interpret",
                               **kw)
        return jnp.sum(o.astype(jnp.float32) * do), o

    (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (o, *g)


def _compare(q, k, v, do, tol: float = 1e-2, block_sizes: fa.BlockSizes | None = None, **kw):
    """Forward and jax.grad with the fused backward vs the float32 reference on upcast inputs."""
    block_sizes = block_sizes or _blocks(q.shape[-1])

    def loss(q, k, v):
        o = fa.flash_attention(q, k, v, block_sizes=block_sizes, backend="mosaic_interpret",
                               **kw)
        return jnp.sum(o.astype(jnp.float32) * do)

    # the fused kernel is the one that runs (and the two-kernel dq kernel is not)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert FUSED_NAME in jaxpr

    def loss_ref(q, k, v):
        o = flash_attention_reference(q, k, v, **kw)
        return jnp.sum(o * do), o

    got = _grads(q, k, v, do, block_sizes, **kw)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, o_ref), g_ref = jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True)(*up)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, (o_ref, *g_ref)):
        assert a.shape == b.shape and a.dtype == q.dtype, name
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
        err = max_rel_error(a, b)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"
    return got


def test_causal_gqa_d64_several_query_blocks():
    """Causal, GQA 4/2: each key CTA (128 keys) visits several 64-row query blocks per head."""
    _compare(*attention_inputs(0, 2, 256, 256, 4, 2, 64), causal=True)


@pytest.mark.parametrize("stages", [2, 3])
def test_ragged_mqa_d128(stages: int):
    """seq_q != seq_kv, neither a multiple of a block (padded inside); MQA group of 4; D 128.
    With a 3-stage ring the float32 dq staging no longer fits beside it: dq goes in 64-column
    halves (two wgmmas and two reduce-adds per block pair)."""
    assert fused.dq_columns(128, 64, 64, stages) == (128 if stages == 2 else 64)
    _compare(*attention_inputs(1, 1, 200, 300, 4, 1, 128), block_sizes=_blocks(
        128, mgpu_num_stages_bwd=stages), causal=True)


def test_dq_sums_over_key_blocks_and_matches_two_kernel_backward():
    """Non-causal, 512 keys = 4 CTAs x 2 warpgroups: every query block's dq is the sum of 8 partial
    products per head, each CTA adding into 4 query blocks x 2 heads. Also equals the two-kernel
    Mosaic backward (same math, different summation order)."""
    q, k, v, do = attention_inputs(2, 1, 256, 512, 4, 2, 64)
    got = _compare(q, k, v, do, causal=False)
    two = _grads(q, k, v, do, fa.BlockSizes.for_head_dim(64), causal=False)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, two):
        assert max_rel_error(a, b) <= 1e-2, name


def test_paired_dq_d128():
    """mgpu_fused_pair_dq: both warpgroups' ds^T feed one dq product per query block, each
    warpgroup adding half of the columns (warpgroup barriers between them); GQA, causal."""
    _compare(*attention_inputs(6, 1, 256, 256, 4, 2, 128), block_sizes=_blocks(
        128, mgpu_fused_pair_dq=True), causal=True)


def test_paired_dq_barriers_leave_no_shared_memory_race():
    """The paired dq's ds^T hand-over between the two warpgroups (one buffer and two barriers per
    step), run directly with the interpreter's race detector on; GQA group of 2, causal, 4 query
    blocks per key CTA. The detector (its verdict is only reachable through JAX's private
    interpreter state) does not see wgmma's operand reads, so the dq check carries the weight:
    the interpreter runs the warpgroups concurrently (a hand-over with a read-release wait
    moved after the ds^T write gave dq off by 0.32)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp
    from jax.experimental.pallas import mosaic_gpu as plgpu

    seq, heads, kv_heads, d = 256, 4, 2, 128
    q, k, v, do = attention_inputs(10, 1, seq, seq, heads, kv_heads, d)
    scale = d ** -0.5
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    o, vjp = jax.vjp(lambda q: flash_attention_reference(q, kf, vf, causal=True), qf)
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, jnp.repeat(kf, heads // kv_heads, axis=2)) * scale
    mask = attention_mask(seq, seq, causal=True, sliding_window=None, q_segment_ids=None,
                          kv_segment_ids=None)
    lse = jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)      # [B, H, T]
    delta = jnp.einsum("bqhd,bqhd->bhq", o, do)
    spec = fa.portable.MaskSpec(seq_q=seq, seq_kv=seq, causal=True, sliding_window=None,
                                has_segments=False, kv_padded=False)
    vis = fa._block_visibility(spec, 64, 128, seq, seq, None, None)
    ranges = fa._ranges(*(jnp.swapaxes(x, 1, 2) for x in vis))
    interp.reset_gpu_interpret_mode_state()
    dq, dk, dv = fused.backward_fused(
        q, k, v, do.astype(q.dtype), lse, delta, ranges, None, None, spec=spec, scale=scale,
        softcap=None, block_q=64, block_kv=64, num_stages=2, pair_dq=True,
        interpret=plgpu.InterpretGPUParams(detect_races=True))
    jax.block_until_ready((dq, dk, dv))
    assert not interp.get_races().races_found
    assert max_rel_error(dq, vjp(do)[0]) <= 1e-2


@pytest.mark.parametrize("pair", [False, True])
def test_overlap_and_stats_tma(pair: bool):
    """mgpu_bwd_overlap (dp^T issued before p^T, one wait with dv's product) and
    mgpu_bwd_stats_tma (lse / delta through the TMA ring) in the fused backward; GQA, softcap,
    segments; plain and paired dq."""
    q, k, v, do = attention_inputs(8, 1, 256, 256, 4, 2, 128)
    seg = jnp.asarray([[0] * 100 + [1] * 156], jnp.int32)
    _compare(q, k, v, do, block_sizes=_blocks(128, mgpu_bwd_overlap=True,
                                              mgpu_bwd_stats_tma=True, mgpu_fused_pair_dq=pair),
             causal=True, softcap=5.0, segment_ids=seg)


def test_window_softcap_scale_segments():
    """Sliding window, soft-capping, custom scale and packed segment ids (mgpu_segments)."""
    q, k, v, do = attention_inputs(3, 1, 256, 256, 2, 1, 64)
    rng = np.random.default_rng(4)
    cuts = np.sort(rng.choice(np.arange(1, 256), size=3, replace=False))
    seg = jnp.asarray(np.searchsorted(cuts, np.arange(256), side="right")[None], jnp.int32)
    _compare(q, k, v, do, block_sizes=_blocks(64, mgpu_segments=True), causal=True,
             sliding_window=90, softcap=5.0, scale=0.2, segment_ids=seg)


def test_float16_tighter():
    _compare(*attention_inputs(5, 1, 128, 128, 2, 1, 64, dtype=jnp.float16), tol=4e-3, causal=True)


def test_block_skipping_keeps_hidden_blocks_zero_cost():
    """With a window far shorter than the sequence most key CTAs visit few query blocks; the ranges
    the fused kernel walks are the dk/dv kernel's (query blocks per 2 * block_kv keys)."""
    seq, bq, bk = 1024, 64, 64
    spec = fa.portable.MaskSpec(seq_q=seq, seq_kv=seq, causal=True, sliding_window=64,
                                has_segments=False, kv_padded=False)
    vis = fa._block_visibility(spec, bq, 2 * bk, seq, seq, None, None)
    r = fa._ranges(*(jnp.swapaxes(x, 1, 2) for x in vis))
    visited = int(jnp.sum(r[:, 3] - r[:, 0]))
    assert visited == 3 * (seq // (2 * bk)) - 1  # 2 diagonal blocks + 1 window block (not at 0)


def test_lowers_for_gpu_with_tma_reduce_add():
    """The GPU version (not interpreted) lowers for CUDA with the TMA reduce-add in the kernel,
    at head_dim 64 and 128 (whole, halved and paired dq) with every feature on. Mosaic checks
    the shared memory budget while lowering, so this also proves it fits in 227 KiB."""
    for d, stages, pair in ((64, 2, False), (128, 2, False), (128, 3, False), (128, 3, True)):
        q = jax.ShapeDtypeStruct((2, 1000, 8, d), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((2, 1000, 2, d), jnp.bfloat16)
        seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)
        bs = _blocks(d, mgpu_segments=True, mgpu_num_stages_bwd=stages, mgpu_fused_pair_dq=pair,
                     mgpu_bwd_overlap=pair, mgpu_bwd_stats_tma=pair)

        def step(q, k, v, seg, bs=bs):
            o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(
                q, k, v, causal=True, sliding_window=300, softcap=20.0, segment_ids=seg,
                block_sizes=bs, backend="mosaic_gpu"), q, k, v)
            return vjp(o)

        text = jax.jit(step).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
        assert FUSED_NAME in text
        assert "cp.reduce.async.bulk.tensor" in text and ".add." in text


def test_off_by_default_and_errors_name_value():
    assert not fa.BlockSizes().mgpu_fused_bwd
    assert not fa.BlockSizes.for_head_dim(128).mgpu_fused_bwd
    with pytest.raises(KernelError, match="mgpu_fused_bwd=1"):
        fa.BlockSizes(mgpu_fused_bwd=1)
    with pytest.raises(KernelError, match="mgpu_num_stages_bwd=0"):
        fa.BlockSizes(mgpu_num_stages_bwd=0)
    # head_dim 128 with 128-row query tiles needs more than the 227 KiB of shared memory
    q = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    bs = _blocks(128, mgpu_block_q_bwd=128)

    def step(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, block_sizes=bs,
                                                            backend="mosaic_gpu"), q, k, v)
        return vjp(o)

    with pytest.raises(KernelError, match="mgpu_block_q_bwd=128"):
        jax.jit(step).trace(q, q, q)
    q = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    bs = _blocks(64, mgpu_fused_pair_dq=True)
    with pytest.raises(KernelError, match="head_dim=64"):
        jax.jit(step).trace(q, q, q)
    assert fused.smem_bytes(128, 64, 64, 2) <= 227 * 1024
