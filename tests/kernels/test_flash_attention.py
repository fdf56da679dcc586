"""Flash attention (interpreted Pallas on CPU) vs the pure-jnp reference: forward and jax.grad."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels import flash_attention as fa
from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.ops.attention import attention, gpu_default_impl
from fastlora_jax.ops.impl import Impl
from fastlora_jax.testing import attention_inputs, max_rel_error

SMALL = fa.BlockSizes(block_q=32, block_kv=16, block_q_dq=16, block_kv_dq=32, block_q_dkv=32,
                      block_kv_dkv=16)


def _compare(q, k, v, do, tol: float = 1e-2, block_sizes: fa.BlockSizes | None = SMALL,
             backend: str = "interpret", **kw):
    """Kernel on q's dtype vs the float32 reference on upcast inputs: output and dq, dk, dv."""
    def loss_kernel(q, k, v):
        o = fa.flash_attention(q, k, v, block_sizes=block_sizes, backend=backend, **kw)
        return jnp.sum(o.astype(jnp.float32) * do), o

    def loss_ref(q, k, v):
        o = flash_attention_reference(q, k, v, **kw)
        return jnp.sum(o * do), o

    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, o), grads = jax.value_and_grad(loss_kernel, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, o_ref), grads_ref = jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True)(*up)
    assert o.dtype == q.dtype and o.shape == q.shape
    for name, got, want in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref)):
        assert got.shape == want.shape, name
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        err = max_rel_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"


def _packed_ids(batch: int, seq: int, docs: int, seed: int) -> jax.Array:
    """Sorted segment ids [batch, seq]: `docs` documents of random lengths per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=docs - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seq), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_gqa(causal: bool):
    _compare(*attention_inputs(0, 2, 64, 64, 4, 2, 64), causal=causal)


def test_mqa_ragged_lengths():
    # seq_q != seq_kv, neither a multiple of any block: padded inside, causal aligned bottom-right.
    _compare(*attention_inputs(1, 1, 37, 53, 4, 1, 64), causal=True)


def test_packed_segments():
    q, k, v, do = attention_inputs(2, 2, 96, 96, 2, 1, 64)
    _compare(q, k, v, do, causal=True, segment_ids=_packed_ids(2, 96, 4, seed=3))


def test_unsorted_segments_non_causal():
    q, k, v, do = attention_inputs(3, 1, 64, 64, 2, 2, 64)
    seg = jax.random.randint(jax.random.key(9), (1, 64), 0, 3)
    _compare(q, k, v, do, causal=False, segment_ids=seg)


def test_sliding_window():
    _compare(*attention_inputs(4, 1, 80, 80, 4, 2, 64), causal=True, sliding_window=19)


def test_softcap_and_scale():
    # Gemma 2: query_pre_attn_scalar scale, logits soft-capped (small cap so it bites).
    _compare(*attention_inputs(5, 1, 64, 64, 4, 2, 128), causal=True, softcap=2.0, scale=0.25)


def test_head_dim_256_window_softcap():
    bs = fa.BlockSizes(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16, block_q_dkv=16,
                       block_kv_dkv=16)
    _compare(*attention_inputs(6, 1, 32, 32, 2, 1, 256), block_sizes=bs, causal=True, sliding_window=12,
             softcap=30.0)


def test_head_dim_not_power_of_two_default_blocks():
    _compare(*attention_inputs(7, 1, 24, 24, 2, 1, 80), block_sizes=None, causal=True)


@pytest.mark.parametrize("backend", ["interpret", "mosaic_interpret"])
def test_float16(backend: str):
    q, k, v, do = attention_inputs(17, 1, 128, 128, 2, 1, 64, dtype=jnp.float16)
    _compare(q, k, v, do, block_sizes=None, backend=backend, causal=True, sliding_window=40)


def test_float32_tight():
    _compare(*attention_inputs(8, 1, 48, 48, 2, 1, 64, dtype=jnp.float32), tol=1e-5, causal=True,
             segment_ids=_packed_ids(1, 48, 3, seed=4), softcap=5.0)


@pytest.mark.parametrize("head_dim, kw", [
    (64, dict(causal=True, sliding_window=50, softcap=5.0, scale=0.2)),
    (128, dict(causal=False)),
])
def test_mosaic_interpreted(head_dim: int, kw: dict):
    """The Hopper (Mosaic GPU) forward and backward kernels, interpreted; ragged lengths."""
    q, k, v, do = attention_inputs(14, 1, 200, 300, 2, 1, head_dim)
    assert fa.mgpu.supported(head_dim, q.dtype) and fa.mgpu_bwd.supported(head_dim, q.dtype)
    _compare(q, k, v, do, block_sizes=None, backend="mosaic_interpret", **kw)


def test_mosaic_segments_interpreted():
    """Segment ids in the Mosaic kernels (BlockSizes.mgpu_segments, the default), interpreted."""
    q, k, v, do = attention_inputs(15, 1, 256, 256, 2, 1, 64)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(64), mgpu_segments=True)
    _compare(q, k, v, do, block_sizes=bs, backend="mosaic_interpret", causal=True,
             segment_ids=_packed_ids(1, 256, 5, seed=6))


def test_segment_isolation_bit_identical():
    """Changing segment 1's tokens leaves segment 0's outputs and gradients bit-identical."""
    q, k, v, do = attention_inputs(10, 1, 64, 64, 2, 1, 64)
    seg = jnp.asarray([[0] * 40 + [1] * 24], jnp.int32)
    in_seg1 = (seg[0] == 1)[None, :, None, None]
    q2, k2, v2, _ = attention_inputs(11, 1, 64, 64, 2, 1, 64)
    q2, k2, v2 = (jnp.where(in_seg1, b, a) for a, b in ((q, q2), (k, k2), (v, v2)))

    def run(q, k, v):
        def loss(q, k, v):
            o = fa.flash_attention(q, k, v, segment_ids=seg, block_sizes=SMALL,
                                   backend="interpret")
            return jnp.sum(o.astype(jnp.float32) * do), o
        (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [np.asarray(x[:, :40].astype(jnp.float32)) for x in (o, *g)]

    base, changed = run(q, k, v), run(q2, k2, v2)
    assert not np.array_equal(np.asarray(q[:, 40:]), np.asarray(q2[:, 40:]))
    for a, b in zip(base, changed):
        np.testing.assert_array_equal(a, b)


def test_block_skipping_packed():
    """Blocks crossing documents are never visited: 8 docs per row visit 80 of 528 causal blocks."""
    seq, block = 4096, 128
    seg = jnp.repeat(jnp.arange(8, dtype=jnp.int32), seq // 8)[None]
    spec = fa.portable.MaskSpec(seq_q=seq, seq_kv=seq, causal=True, sliding_window=None,
                                has_segments=True, kv_padded=False)
    r = fa._ranges(*fa._block_visibility(spec, block, block, seq, seq, seg, seg))
    visited = int(jnp.sum(r[:, 3] - r[:, 0]))
    unmasked = int(jnp.sum(r[:, 2] - r[:, 1]))
    assert unmasked == 8 * (4 * 3 // 2)  # all but the diagonal blocks skip the mask
    n = seq // block
    assert visited == 8 * (4 * 5 // 2)  # 8 documents of 4 blocks, causal within each
    assert visited * 6 < n * (n + 1) // 2  # 80 of the 528 causal blocks


def test_ranges_full_span_only_when_contiguous():
    any_ = jnp.asarray([[[True, True, True, True, False]]])
    gappy = jnp.asarray([[[False, True, False, True, False]]])  # full blocks 1 and 3, not 2
    dense = jnp.asarray([[[False, True, True, False, False]]])
    np.testing.assert_array_equal(fa._ranges(any_, gappy)[0, :, 0], [0, 0, 0, 4])
    np.testing.assert_array_equal(fa._ranges(any_, dense)[0, :, 0], [0, 1, 3, 4])


def test_unsorted_segments_with_uniform_blocks():
    """Segment ids that are not sorted but constant over some blocks (gaps in the full span)."""
    q, k, v, do = attention_inputs(16, 1, 96, 96, 2, 1, 64)
    seg = jnp.asarray([[0] * 32 + [1] * 16 + [0] * 16 + [1] * 32], jnp.int32)
    _compare(q, k, v, do, causal=False, segment_ids=seg,
             block_sizes=fa.BlockSizes(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16,
                                       block_q_dkv=16, block_kv_dkv=16))


def test_memory_linear_in_seq_at_65536():
    """fwd+bwd compiled at seq 65,536 (packed, causal) needs O(seq) scratch: no [seq, seq] buffer."""
    seq, heads, kv_heads, d = 65536, 2, 1, 64
    q = jax.ShapeDtypeStruct((1, seq, heads, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, seq, kv_heads, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def step(q, k, v, seg):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(
            q, k, v, causal=True, segment_ids=seg, backend="interpret"), q, k, v)
        return vjp(o)

    mem = jax.jit(step).lower(q, k, k, seg).compile().memory_analysis()
    io = mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert mem.temp_size_in_bytes < 8 * io, f"{mem.temp_size_in_bytes=} vs {io=}"
    assert mem.temp_size_in_bytes < seq * seq  # one bf16 score matrix would be 8 GiB


def test_dispatch_pallas():
    q, k, v, _ = attention_inputs(12, 1, 32, 32, 4, 2, 64)
    got = attention(q, k, v, impl="pallas", causal=True, sliding_window=8)
    want = flash_attention_reference(q, k, v, causal=True, sliding_window=8)
    assert max_rel_error(got, want) <= 1e-2


def test_gpu_default_rule():
    seg = jnp.zeros((1, 8), jnp.int32)
    assert gpu_default_impl(segment_ids=None, sliding_window=None, softcap=None) is Impl.CUDNN
    assert gpu_default_impl(segment_ids=seg, sliding_window=None, softcap=None) is Impl.PALLAS
    # a window alone goes to cuDNN's local_window_size (faster there on the H200)
    assert gpu_default_impl(segment_ids=None, sliding_window=4, softcap=None) is Impl.CUDNN
    assert gpu_default_impl(segment_ids=seg, sliding_window=4, softcap=None) is Impl.PALLAS
    assert gpu_default_impl(segment_ids=None, sliding_window=None, softcap=30.0) is Impl.PALLAS
    assert fa.default_backend() is fa.Backend.INTERPRET  # CPU


@pytest.mark.parametrize("field, value", [("block_q", 48), ("block_kv_dkv", 8), ("num_warps", 3),
                                          ("num_stages", 0)])
def test_block_sizes_errors_name_value(field: str, value: int):
    with pytest.raises(KernelError, match=f"{field}={value}"):
        fa.BlockSizes(**{field: value})


def test_shape_errors_name_value():
    q, k, v, _ = attention_inputs(13, 1, 16, 16, 3, 2, 64)
    with pytest.raises(KernelError, match="heads=3"):
        fa.flash_attention(q, k, v)
    q, k, v, _ = attention_inputs(13, 1, 16, 16, 2, 1, 64)
    with pytest.raises(KernelError, match="sliding_window=0"):
        fa.flash_attention(q, k, v, sliding_window=0)
    with pytest.raises(KernelError, match="segment_ids.shape"):
        fa.flash_attention(q, k, v, segment_ids=jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(KernelError, match="mgpu_block_kv=96"):
        fa.BlockSizes(mgpu_block_kv=96)
    with pytest.raises(KernelError, match="backend='cuda'"):
        fa.flash_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("group_in_kernel", [True, False])
def test_mosaic_dkv_group_interpreted(group_in_kernel: bool):
    """dk/dv summed over each kv head's query-head group inside the Mosaic kernel
    (BlockSizes.mgpu_dkv_group, the default) or per query head and summed after; interpreted:
    GQA group 2, ragged length, segments."""
    q, k, v, do = attention_inputs(16, 1, 200, 200, 4, 2, 64)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(64), mgpu_dkv_group=group_in_kernel,
                             mgpu_segments=True)
    _compare(q, k, v, do, block_sizes=bs, backend="mosaic_interpret", causal=True,
             segment_ids=_packed_ids(1, 200, 3, seed=7))


def test_mosaic_reverse_tiles_three_stages_interpreted():
    """Query tiles launched last-first (BlockSizes.mgpu_reverse_tiles) with a 3-slot backward
    ring, interpreted: several query tiles under a causal mask and a window."""
    q, k, v, do = attention_inputs(18, 1, 384, 384, 2, 1, 64)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(64), mgpu_reverse_tiles=True,
                             mgpu_num_stages_bwd=3)
    _compare(q, k, v, do, block_sizes=bs, backend="mosaic_interpret", causal=True,
             sliding_window=150)


@pytest.mark.parametrize("kw", [dict(causal=True, softcap=5.0, scale=0.2),
                                dict(causal=True, sliding_window=70)])
@pytest.mark.parametrize("overlap, stats_tma", [(True, False), (False, True), (True, True)])
def test_mosaic_bwd_schedules_interpreted(kw: dict, overlap: bool, stats_tma: bool):
    """The backward kernels with the do/v product issued before the probabilities
    (BlockSizes.mgpu_bwd_overlap) and lse / delta through the TMA ring (mgpu_bwd_stats_tma),
    interpreted: GQA, segments, softcap / window."""
    q, k, v, do = attention_inputs(19, 1, 256, 256, 4, 2, 64)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(64), mgpu_bwd_overlap=overlap,
                             mgpu_bwd_stats_tma=stats_tma)
    _compare(q, k, v, do, block_sizes=bs, backend="mosaic_interpret",
             segment_ids=_packed_ids(1, 256, 3, seed=8), **kw)


@pytest.mark.parametrize("overrides", [dict(mgpu_bwd_overlap=True, mgpu_bwd_stats_tma=True),
                                       dict(mgpu_bwd_stats_tma=True, mgpu_dkv_group=False),
                                       dict(mgpu_pingpong=False, mgpu_dkv_group=False,
                                            mgpu_reverse_tiles=False, mgpu_segments=False)])
def test_mosaic_schedules_lower_for_gpu(overrides: dict):
    """The Mosaic kernels lower for CUDA (three Mosaic GPU kernels: forward, dq, dk/dv) with the
    GPU-only schedules (pingpong is off under the interpreter) and with every option off."""
    q = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(64), **overrides)

    def step(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(
            q, k, v, causal=True, sliding_window=100, block_sizes=bs, backend="mosaic_gpu"),
            q, k, v)
        return vjp(o)

    text = jax.jit(step).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3
