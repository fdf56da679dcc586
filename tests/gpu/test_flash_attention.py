"""Flash attention on the GPU (the Triton kernels, and the Mosaic GPU ones on Hopper) against the
float32 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.kernels.flash_attention import flash_attention
from fastlora_jax.ops import Impl
from fastlora_jax.ops.impl import is_hopper
from fastlora_jax.testing import attention_inputs, max_rel_error, packed_segment_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

IMPLS = [Impl.PALLAS_TRITON,
         pytest.param(Impl.PALLAS_MOSAIC, marks=pytest.mark.skipif(
             jax.default_backend() == "gpu" and not is_hopper(), reason="needs sm_90"))]


def _compare(impl: Impl, q, k, v, do, tol: float = 1e-2, **kw) -> None:
    @jax.jit
    def kernel(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, impl=impl, **kw), q, k, v)
        return (o, *vjp(do.astype(o.dtype)))

    @jax.jit
    def ref(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, **kw), q, k, v)
        return (o, *vjp(do))

    got = kernel(q, k, v, do)
    want = ref(*(x.astype(jnp.float32) for x in (q, k, v)), do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        err = max_rel_error(a, b)
        assert err <= tol, f"{impl.value} {name}: relative error {err:.3e} > {tol}"


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


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(impl: Impl, case: str):
    shape, kw = CASES[case]
    _compare(impl, *attention_inputs(0, **shape), **kw)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_packed_segments(impl: Impl):
    q, k, v, do = attention_inputs(1, 2, 1024, 1024, 8, 2, 128)
    _compare(impl, q, k, v, do, causal=True, segment_ids=packed_segment_ids(2, 1024, 8, seed=2))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_segment_isolation_bit_identical(impl: Impl):
    q, k, v, do = attention_inputs(3, 1, 512, 512, 4, 2, 128)
    seg = jnp.asarray([[0] * 300 + [1] * 212], jnp.int32)
    in_seg1 = (seg[0] == 1)[None, :, None, None]
    q2, k2, v2, _ = attention_inputs(4, 1, 512, 512, 4, 2, 128)
    q2, k2, v2 = (jnp.where(in_seg1, b, a) for a, b in ((q, q2), (k, k2), (v, v2)))

    @jax.jit
    def run(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, impl=impl),
                         q, k, v)
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
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v)
        return vjp(o)

    mem = jax.jit(step).lower(q, k, k).compile().memory_analysis()
    io = 2 * seq * (heads + 2 * kv_heads) * d * 2  # inputs + grads, bf16
    assert mem.temp_size_in_bytes < 16 * io, f"{mem.temp_size_in_bytes=} vs {io=}"
    assert mem.temp_size_in_bytes < seq * seq  # far below one bf16 score matrix per head pair
