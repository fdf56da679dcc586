"""Flash attention on the GPU (every backend that runs there) against the float32 reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels import flash_attention as fa
from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.testing import attention_inputs, max_rel_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

BACKENDS = [b for b in fa.Backend if not b.interpreted]


def _packed_ids(batch: int, seq: int, docs: int, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=docs - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seq), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _compare(backend: fa.Backend, q, k, v, do, tol: float = 1e-2, **kw) -> None:
    @jax.jit
    def kernel(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, backend=backend, **kw),
                         q, k, v)
        return (o, *vjp(do.astype(o.dtype)))

    ref_kw = {name: value for name, value in kw.items() if name != "block_sizes"}

    @jax.jit
    def ref(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, **ref_kw), q, k, v)
        return (o, *vjp(do))

    got = kernel(q, k, v, do)
    want = ref(*(x.astype(jnp.float32) for x in (q, k, v)), do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        err = max_rel_error(a, b)
        assert err <= tol, f"{backend.value} {name}: relative error {err:.3e} > {tol}"


CASES = {
    "causal_gqa_d128": (dict(batch=2, seq_q=1024, seq_kv=1024, heads=8, kv_heads=2, head_dim=128),
                        dict(causal=True)),
    "noncausal_mqa_d64": (dict(batch=1, seq_q=512, seq_kv=512, heads=4, kv_heads=1, head_dim=64),
                          dict(causal=False)),
    "ragged_d128": (dict(batch=1, seq_q=700, seq_kv=1000, heads=4, kv_heads=2, head_dim=128),
                    dict(causal=True)),
    "window_d128": (dict(batch=1, seq_q=1024, seq_kv=1024, heads=4, kv_heads=2, head_dim=128),
                    dict(causal=True, sliding_window=200)),
    "softcap_scale_d256": (dict(batch=1, seq_q=512, seq_kv=512, heads=4, kv_heads=2, head_dim=256),
                           dict(causal=True, softcap=20.0, scale=0.0625, sliding_window=300)),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(backend: fa.Backend, case: str):
    shape, kw = CASES[case]
    _compare(backend, *attention_inputs(0, **shape), **kw)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_packed_segments(backend: fa.Backend):
    q, k, v, do = attention_inputs(1, 2, 1024, 1024, 8, 2, 128)
    _compare(backend, q, k, v, do, causal=True, segment_ids=_packed_ids(2, 1024, 8, seed=2))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_segment_isolation_bit_identical(backend: fa.Backend):
    q, k, v, do = attention_inputs(3, 1, 512, 512, 4, 2, 128)
    seg = jnp.asarray([[0] * 300 + [1] * 212], jnp.int32)
    in_seg1 = (seg[0] == 1)[None, :, None, None]
    q2, k2, v2, _ = attention_inputs(4, 1, 512, 512, 4, 2, 128)
    q2, k2, v2 = (jnp.where(in_seg1, b, a) for a, b in ((q, q2), (k, k2), (v, v2)))

    @jax.jit
    def run(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg,
                                                            backend=backend), q, k, v)
        return [x[:, :300] for x in (o, *vjp(do.astype(o.dtype)))]

    for a, b in zip(run(q, k, v), run(q2, k2, v2)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))


MOSAIC_VARIANTS = {"pingpong": dict(mgpu_pingpong=True), "dkv_group": dict(mgpu_dkv_group=True),
                   "segments": dict(mgpu_segments=True),
                   "reverse_stages3": dict(mgpu_reverse_tiles=True, mgpu_num_stages_bwd=3),
                   "bwd_overlap": dict(mgpu_bwd_overlap=True),
                   "bwd_stats_tma": dict(mgpu_bwd_stats_tma=True),
                   "bwd_both": dict(mgpu_bwd_overlap=True, mgpu_bwd_stats_tma=True),
                   "all": dict(mgpu_pingpong=True, mgpu_dkv_group=True, mgpu_segments=True)}


def _variant(head_dim: int, name: str) -> fa.BlockSizes:
    return dataclasses.replace(fa.BlockSizes.for_head_dim(head_dim), **MOSAIC_VARIANTS[name])


@pytest.mark.parametrize("variant", ["pingpong", "dkv_group", "all", "reverse_stages3",
                                     "bwd_overlap", "bwd_stats_tma", "bwd_both"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mosaic_variant_matches_reference(variant: str, case: str):
    """Opt-in Mosaic kernel schedules (BlockSizes.mgpu_pingpong / mgpu_dkv_group) on every case."""
    shape, kw = CASES[case]
    _compare(fa.Backend.MOSAIC_GPU, *attention_inputs(0, **shape),
             block_sizes=_variant(shape["head_dim"], variant), **kw)


@pytest.mark.parametrize("variant", ["segments", "all", "bwd_both"])
def test_mosaic_variant_packed_segments(variant: str):
    q, k, v, do = attention_inputs(1, 2, 1024, 1024, 8, 2, 128)
    _compare(fa.Backend.MOSAIC_GPU, q, k, v, do, causal=True, block_sizes=_variant(128, variant),
             segment_ids=_packed_ids(2, 1024, 8, seed=2))


@pytest.mark.parametrize("variant", ["segments", "all"])
def test_mosaic_variant_segment_isolation_bit_identical(variant: str):
    q, k, v, do = attention_inputs(3, 1, 512, 512, 4, 2, 128)
    seg = jnp.asarray([[0] * 300 + [1] * 212], jnp.int32)
    in_seg1 = (seg[0] == 1)[None, :, None, None]
    q2, k2, v2, _ = attention_inputs(4, 1, 512, 512, 4, 2, 128)
    q2, k2, v2 = (jnp.where(in_seg1, b, a) for a, b in ((q, q2), (k, k2), (v, v2)))
    bs = _variant(128, variant)

    @jax.jit
    def run(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(
            q, k, v, segment_ids=seg, block_sizes=bs, backend=fa.Backend.MOSAIC_GPU), q, k, v)
        return [x[:, :300] for x in (o, *vjp(do.astype(o.dtype)))]

    for a, b in zip(run(q, k, v), run(q2, k2, v2)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))


def test_memory_is_linear_in_seq():
    """fwd+bwd at seq 65,536 compiles to O(seq) scratch (a dense score matrix would be 16 GiB)."""
    seq, heads, kv_heads, d = 65536, 8, 2, 128
    q = jax.ShapeDtypeStruct((1, seq, heads, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, seq, kv_heads, d), jnp.bfloat16)

    def step(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, causal=True), q, k, v)
        return vjp(o)

    mem = jax.jit(step).lower(q, k, k).compile().memory_analysis()
    io = 2 * seq * (heads + 2 * kv_heads) * d * 2  # inputs + grads, bf16
    assert mem.temp_size_in_bytes < 16 * io, f"{mem.temp_size_in_bytes=} vs {io=}"
    assert mem.temp_size_in_bytes < seq * seq  # far below one bf16 score matrix per head pair


FUSED_CASES = ["causal_gqa_d128", "noncausal_mqa_d64", "ragged_d128", "window_d128"]


@pytest.mark.parametrize("stages, pair", [(2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_backward_matches_reference(case: str, stages: int, pair: bool):
    """The fused Mosaic backward (one kernel, dq by TMA reduce-add; BlockSizes.mgpu_fused_bwd);
    3 stages at head_dim 128 computes dq in 64-column halves; pair: mgpu_fused_pair_dq."""
    shape, kw = CASES[case]
    if pair and shape["head_dim"] != 128:
        pytest.skip("mgpu_fused_pair_dq needs head_dim 128")
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(shape["head_dim"]), mgpu_fused_bwd=True,
                             mgpu_num_stages_bwd=stages, mgpu_fused_pair_dq=pair)
    _compare(fa.Backend.MOSAIC_GPU, *attention_inputs(0, **shape), block_sizes=bs, **kw)


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("case", ["causal_gqa_d128", "window_d128"])
def test_fused_backward_overlap_stats_tma(case: str, pair: bool):
    """The fused backward with mgpu_bwd_overlap and mgpu_bwd_stats_tma (plain and paired dq)."""
    shape, kw = CASES[case]
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(shape["head_dim"]), mgpu_fused_bwd=True,
                             mgpu_bwd_overlap=True, mgpu_bwd_stats_tma=True,
                             mgpu_fused_pair_dq=pair)
    _compare(fa.Backend.MOSAIC_GPU, *attention_inputs(0, **shape), block_sizes=bs, **kw)


def test_fused_backward_packed_segments_softcap():
    q, k, v, do = attention_inputs(5, 2, 1024, 1024, 8, 2, 64)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(64), mgpu_fused_bwd=True,
                             mgpu_segments=True)
    _compare(fa.Backend.MOSAIC_GPU, q, k, v, do, block_sizes=bs, causal=True, softcap=20.0,
             scale=0.1, segment_ids=_packed_ids(2, 1024, 8, seed=6))


def test_fused_backward_equals_two_kernel_backward():
    """Same math as the two-kernel Mosaic backward; dq differs only by float32 summation order."""
    q, k, v, do = attention_inputs(7, 2, 2048, 2048, 8, 2, 128)

    def grads(bs):
        f = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: fa.flash_attention(
            q, k, v, causal=True, block_sizes=bs, backend=fa.Backend.MOSAIC_GPU), q, k, v)[1](do))
        return f(q, k, v, do.astype(q.dtype))

    base = fa.BlockSizes.for_head_dim(128)
    for name, a, b in zip(("dq", "dk", "dv"), grads(dataclasses.replace(base, mgpu_fused_bwd=True)),
                          grads(base)):
        assert max_rel_error(a, b.astype(jnp.float32)) <= 1e-2, name
