"""The CPU's dense attention (hand-written backward) against autodiff of the reference, on fresh
random inputs: output and dq, dk, dv for every mask feature, softcap, GQA, seq_q != seq_kv and
rows with no visible key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels.attention_dense import dense_attention
from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.ops import attention, defaults
from fastlora_jax.ops.impl import Impl


def _inputs(batch, seq_q, seq_kv, heads, kv_heads, dim, dtype=jnp.float32):
    seed = int(np.random.default_rng().integers(1 << 30))
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (batch, seq_q, heads, dim)).astype(dtype)
    k = jax.random.normal(ks[1], (batch, seq_kv, kv_heads, dim)).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_kv, kv_heads, dim)).astype(dtype)
    do = jax.random.normal(ks[3], (batch, seq_q, heads, dim))
    return q, k, v, do, seed


def _check(q, k, v, do, seed, *, seg=None, kv_seg=None, bid=None, causal=True, window=None,
           softcap=None, scale=0.3, tol=2e-5):
    def ours(q, k, v):
        return dense_attention(q, k, v, seg, kv_seg, bid, causal, window, softcap, scale)

    def ref(q, k, v):
        return flash_attention_reference(q, k, v, causal=causal, segment_ids=seg,
                                         kv_segment_ids=kv_seg, bidirectional_ids=bid,
                                         sliding_window=window,
                                         softcap=softcap, scale=scale)

    got, pull = jax.vjp(jax.jit(ours), q, k, v)
    want, pull_ref = jax.vjp(ref, q, k, v)
    assert got.dtype == q.dtype and got.shape == q.shape
    for name, a, b in zip(("o", "dq", "dk", "dv"), (got, *pull(do.astype(got.dtype))),
                          (want, *pull_ref(do.astype(want.dtype)))):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol, err_msg=f"{name} (seed {seed})")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_matches_reference_gradients(causal, window, softcap):
    q, k, v, do, seed = _inputs(2, 24, 24, 6, 2, 16)
    _check(q, k, v, do, seed, causal=causal, window=window, softcap=softcap)


def test_packed_segments_and_rows_with_no_visible_key():
    """Two documents in row 0; in row 1 the first queries' segment has no key at all (their
    output and gradients must be zeros, as the reference's)."""
    q, k, v, do, seed = _inputs(2, 20, 20, 4, 4, 8)
    seg = jnp.asarray([[1] * 7 + [2] * 13, [3] * 4 + [1] * 16], jnp.int32)
    kv_seg = jnp.asarray([[1] * 7 + [2] * 13, [1] * 20], jnp.int32)
    _check(q, k, v, do, seed, seg=seg, kv_seg=kv_seg)
    out = dense_attention(q, k, v, seg, kv_seg, None, True, None, None, 0.3)
    assert float(jnp.max(jnp.abs(out[1, :4]))) == 0.0


def test_bidirectional_ids():
    """Gemma 3's image tokens (a nonzero id) see each other both ways, with a window."""
    q, k, v, do, seed = _inputs(2, 16, 16, 4, 2, 8)
    bid = jnp.asarray([[0] * 3 + [1] * 5 + [0] * 8, [0] * 6 + [2] * 4 + [0] * 6], jnp.int32)
    _check(q, k, v, do, seed, bid=bid, window=6)


def test_fewer_queries_than_keys():
    """seq_q < seq_kv: the causal mask is aligned bottom-right (the chunked-prefill case)."""
    q, k, v, do, seed = _inputs(1, 8, 20, 4, 1, 16)
    _check(q, k, v, do, seed)


def test_bfloat16_inputs():
    q, k, v, do, seed = _inputs(2, 16, 16, 4, 2, 16, jnp.bfloat16)
    _check(q, k, v, do, seed, tol=2e-2)


def test_cpu_default_is_the_dense_path():
    """On the CPU `ops.attention` with no impl runs it (the CPU default's rule), segment ids or
    not, and agrees with the reference."""
    assert defaults.attention_impl(gpu=False, hopper=False, segments=True,
                                   softcap=True) is Impl.XLA
    q, k, v, do, seed = _inputs(2, 12, 12, 4, 2, 8)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    got = attention(q, k, v, segment_ids=seg, softcap=3.0)
    want = dense_attention(q, k, v, seg, seg, None, True, None, 3.0, 8 ** -0.5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
