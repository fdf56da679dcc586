"""Flash attention (interpreted Pallas on CPU: Triton and Mosaic GPU kernels) vs the pure-jnp
reference: forward and jax.grad."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.attention_mask import MaskSpec, block_visibility, visit_ranges
from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.kernels.flash_attention import (MosaicBlockSizes, TritonBlockSizes,
                                                  flash_attention)
from fastlora_jax.kernels.flash_attention_mgpu import mosaic_forward_supports
from fastlora_jax.kernels.flash_attention_mgpu_bwd import mosaic_backward_supports
from fastlora_jax.ops import defaults
from fastlora_jax.ops.attention import attention
from fastlora_jax.ops.impl import Impl
from fastlora_jax.testing import attention_inputs, max_rel_error, packed_segment_ids

TRITON, MOSAIC = Impl.PALLAS_TRITON, Impl.PALLAS_MOSAIC


def _blocks(head_dim: int = 64, **blocks) -> TritonBlockSizes:
    return dataclasses.replace(TritonBlockSizes.for_head_dim(head_dim), **blocks)


SMALL = _blocks(block_q=32, block_kv=16, block_q_dq=16, block_kv_dq=32, block_q_dkv=32,
                block_kv_dkv=16)


def _compare(q, k, v, do, tol: float = 1e-2, triton_blocks: TritonBlockSizes | None = SMALL,
             impl: Impl = TRITON, **kw):
    """Kernel on q's dtype vs the float32 reference on upcast inputs: output and dq, dk, dv."""
    def loss_kernel(q, k, v):
        o = flash_attention(q, k, v, triton_blocks=triton_blocks, impl=impl, **kw)
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


@pytest.mark.parametrize("causal", [True, False])
def test_gqa(causal: bool):
    _compare(*attention_inputs(0, 2, 64, 64, 4, 2, 64), causal=causal)


def test_mqa_ragged_lengths():
    # seq_q != seq_kv, neither a multiple of any block: padded inside, causal aligned bottom-right.
    _compare(*attention_inputs(1, 1, 37, 53, 4, 1, 64), causal=True)


def test_packed_segments():
    q, k, v, do = attention_inputs(2, 2, 96, 96, 2, 1, 64)
    _compare(q, k, v, do, causal=True, segment_ids=packed_segment_ids(2, 96, 4, seed=3))


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
    bs = _blocks(256, block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16, block_q_dkv=16,
                 block_kv_dkv=16)
    _compare(*attention_inputs(6, 1, 32, 32, 2, 1, 256), triton_blocks=bs, causal=True,
             sliding_window=12, softcap=30.0)


def test_head_dim_not_power_of_two_default_blocks():
    _compare(*attention_inputs(7, 1, 24, 24, 2, 1, 80), triton_blocks=None, causal=True)


@pytest.mark.parametrize("impl", [TRITON, MOSAIC])
def test_float16(impl: Impl):
    q, k, v, do = attention_inputs(17, 1, 128, 128, 2, 1, 64, dtype=jnp.float16)
    _compare(q, k, v, do, triton_blocks=None, impl=impl, causal=True, sliding_window=40)


def test_float32_tight():
    _compare(*attention_inputs(8, 1, 48, 48, 2, 1, 64, dtype=jnp.float32), tol=1e-5, causal=True,
             segment_ids=packed_segment_ids(1, 48, 3, seed=4), softcap=5.0)


@pytest.mark.parametrize("head_dim, kw", [
    (64, dict(causal=True, sliding_window=50, softcap=5.0, scale=0.2)),
    (128, dict(causal=False)),
])
def test_mosaic_interpreted(head_dim: int, kw: dict):
    """The Hopper (Mosaic GPU) forward and backward kernels, interpreted; ragged lengths."""
    q, k, v, do = attention_inputs(14, 1, 200, 300, 2, 1, head_dim)
    assert mosaic_forward_supports(head_dim, q.dtype)
    assert mosaic_backward_supports(head_dim, q.dtype)
    _compare(q, k, v, do, triton_blocks=None, impl=MOSAIC, **kw)


def test_mosaic_segments_interpreted():
    """Segment ids in the Mosaic kernels, interpreted: GQA group 2 (dk/dv summed over each kv
    head's query heads in the kernel), a ragged length, several query tiles (taken last-first)
    and a 3-slot backward ring."""
    q, k, v, do = attention_inputs(15, 1, 200, 200, 4, 2, 64)
    _compare(q, k, v, do, triton_blocks=None, impl=MOSAIC, causal=True,
             segment_ids=packed_segment_ids(1, 200, 3, seed=7))


def test_mosaic_window_several_tiles_interpreted():
    """Several query tiles under a causal mask and a window (which blocks each CTA visits)."""
    q, k, v, do = attention_inputs(18, 1, 384, 384, 2, 1, 64)
    assert MosaicBlockSizes.for_head_dim(64).num_stages_bwd == 3
    _compare(q, k, v, do, triton_blocks=None, impl=MOSAIC, causal=True, sliding_window=150)


def test_segment_isolation_bit_identical():
    """Changing segment 1's tokens leaves segment 0's outputs and gradients bit-identical."""
    q, k, v, do = attention_inputs(10, 1, 64, 64, 2, 1, 64)
    seg = jnp.asarray([[0] * 40 + [1] * 24], jnp.int32)
    in_seg1 = (seg[0] == 1)[None, :, None, None]
    q2, k2, v2, _ = attention_inputs(11, 1, 64, 64, 2, 1, 64)
    q2, k2, v2 = (jnp.where(in_seg1, b, a) for a, b in ((q, q2), (k, k2), (v, v2)))

    def run(q, k, v):
        def loss(q, k, v):
            o = flash_attention(q, k, v, segment_ids=seg, triton_blocks=SMALL, impl=TRITON)
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
    spec = MaskSpec(seq_q=seq, seq_kv=seq, causal=True, sliding_window=None, has_segments=True,
                    kv_padded=False)
    r = visit_ranges(*block_visibility(spec, block, block, seq, seq, seg, seg))
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
    np.testing.assert_array_equal(visit_ranges(any_, gappy)[0, :, 0], [0, 0, 0, 4])
    np.testing.assert_array_equal(visit_ranges(any_, dense)[0, :, 0], [0, 1, 3, 4])


def test_unsorted_segments_with_uniform_blocks():
    """Segment ids that are not sorted but constant over some blocks (gaps in the full span)."""
    q, k, v, do = attention_inputs(16, 1, 96, 96, 2, 1, 64)
    seg = jnp.asarray([[0] * 32 + [1] * 16 + [0] * 16 + [1] * 32], jnp.int32)
    _compare(q, k, v, do, causal=False, segment_ids=seg,
             triton_blocks=_blocks(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16,
                                   block_q_dkv=16, block_kv_dkv=16))


def test_memory_linear_in_seq_at_65536():
    """fwd+bwd compiled at seq 65,536 (packed, causal) needs O(seq) scratch: no [seq, seq] buffer."""
    seq, heads, kv_heads, d = 65536, 2, 1, 64
    q = jax.ShapeDtypeStruct((1, seq, heads, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, seq, kv_heads, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def step(q, k, v, seg):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, causal=True, segment_ids=seg, impl=TRITON), q, k, v)
        return vjp(o)

    mem = jax.jit(step).lower(q, k, k, seg).compile().memory_analysis()
    io = mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert mem.temp_size_in_bytes < 8 * io, f"{mem.temp_size_in_bytes=} vs {io=}"
    assert mem.temp_size_in_bytes < seq * seq  # one bf16 score matrix would be 8 GiB


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic"])
def test_dispatch_pallas(impl: str):
    q, k, v, _ = attention_inputs(12, 1, 32, 32, 4, 2, 64)
    got = attention(q, k, v, impl=impl, causal=True, sliding_window=8)
    want = flash_attention_reference(q, k, v, causal=True, sliding_window=8)
    assert max_rel_error(got, want) <= 1e-2


def test_default_rules():
    rule = defaults.attention_impl
    assert rule(gpu=True, hopper=True, segments=False, softcap=False) is Impl.CUDNN
    # a window alone goes to cuDNN's local_window_size (faster there on the H200)
    assert rule(gpu=True, hopper=True, segments=True, softcap=False) is Impl.PALLAS_MOSAIC
    assert rule(gpu=True, hopper=False, segments=True, softcap=False) is Impl.PALLAS_TRITON
    assert rule(gpu=True, hopper=True, segments=False, softcap=True) is Impl.PALLAS_MOSAIC
    assert rule(gpu=False, hopper=False, segments=True, softcap=True) is Impl.XLA
    # what cuDNN refuses (float32, odd lengths) runs XLA's attention on the GPU
    assert rule(gpu=True, hopper=True, segments=False, softcap=False,
                cudnn_fits=False) is Impl.XLA
    takes = defaults.cudnn_takes
    assert takes(dtype=jnp.bfloat16, head_dim=64, q_len=576, kv_len=576, hopper=True)
    assert not takes(dtype=jnp.float32, head_dim=64, q_len=576, kv_len=576, hopper=True)
    assert not takes(dtype=jnp.bfloat16, head_dim=64, q_len=577, kv_len=577, hopper=True)
    assert not takes(dtype=jnp.bfloat16, head_dim=20, q_len=576, kv_len=576, hopper=True)
    assert not takes(dtype=jnp.float16, head_dim=256, q_len=576, kv_len=576, hopper=False)
    assert defaults.flash_attention_impl(hopper=False) is Impl.PALLAS_TRITON


def test_tiles_come_from_the_defaults_table():
    assert TritonBlockSizes.for_head_dim(64).num_warps == 4
    assert TritonBlockSizes.for_head_dim(80).num_warps == 8      # the 128 row
    assert TritonBlockSizes.for_head_dim(256).block_q == 64
    assert MosaicBlockSizes.for_head_dim(128).block_kv == 128
    assert MosaicBlockSizes.for_head_dim(192).block_kv == 64     # the 256 row


@pytest.mark.parametrize("field, value", [("block_q", 48), ("block_kv_dkv", 8), ("num_warps", 3),
                                          ("num_stages", 0)])
def test_block_sizes_errors_name_value(field: str, value: int):
    with pytest.raises(KernelError, match=f"{field}={value}"):
        _blocks(**{field: value})


def test_shape_errors_name_value():
    q, k, v, _ = attention_inputs(13, 1, 16, 16, 3, 2, 64)
    with pytest.raises(KernelError, match="heads=3"):
        flash_attention(q, k, v)
    q, k, v, _ = attention_inputs(13, 1, 16, 16, 2, 1, 64)
    with pytest.raises(KernelError, match="sliding_window=0"):
        flash_attention(q, k, v, sliding_window=0)
    with pytest.raises(KernelError, match="segment_ids.shape"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(KernelError, match="block_kv=96"):
        dataclasses.replace(MosaicBlockSizes.for_head_dim(64), block_kv=96)
    with pytest.raises(KernelError, match="impl='cuda'"):
        flash_attention(q, k, v, impl="cuda")
    with pytest.raises(KernelError, match="impl='cudnn' is not a Pallas"):
        flash_attention(q, k, v, impl=Impl.CUDNN)
