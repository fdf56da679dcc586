"""The text decoder's hooks for vision-language models: precomputed input embeddings and image
blocks that attend both ways (Gemma 3), through the mask, the attention dispatch, the decoder
and the KV-cache prefill."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ModelConfig, ops
from fastlora_jax.kernels.attention_mask import dense_mask
from fastlora_jax.models import decoder
from fastlora_jax.models.kv_cache import cached_hidden_states, init_cache

CFG = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def brute_mask(ids: np.ndarray, seg: np.ndarray | None, window: int | None) -> np.ndarray:
    """transformers' rule spelt out per pair: (causal or same image block) and window and
    same segment."""
    b, t = ids.shape
    out = np.zeros((b, 1, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(t):
                ok = j <= i or (ids[r, i] > 0 and ids[r, i] == ids[r, j])
                ok &= window is None or j > i - window
                ok &= seg is None or seg[r, i] == seg[r, j]
                out[r, 0, i, j] = ok
    return out


IDS = np.array([[0, 1, 1, 1, 0, 0, 2, 2, 0, 0],
                [3, 3, 0, 0, 0, 0, 0, 4, 4, 4]], np.int32)
SEG = np.array([[1] * 10, [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]], np.int32)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("segments", [False, True])
def test_dense_mask_image_blocks(window: int | None, segments: bool) -> None:
    seg = SEG if segments else None
    got = dense_mask(10, 10, causal=True, sliding_window=window,
                     q_segment_ids=None if seg is None else jnp.asarray(seg),
                     kv_segment_ids=None if seg is None else jnp.asarray(seg),
                     bidirectional_ids=jnp.asarray(IDS))
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (2, 1, 10, 10)),
                                  brute_mask(IDS, seg, window))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_attention_with_image_blocks(impl: str) -> None:
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (2, 10, 4, 8))
    k = jax.random.normal(kk, (2, 10, 2, 8))
    v = jax.random.normal(kv, (2, 10, 2, 8))
    got = ops.attention(q, k, v, segment_ids=jnp.asarray(SEG), sliding_window=3, impl=impl,
                        bidirectional_ids=jnp.asarray(IDS))
    mask = brute_mask(IDS, SEG, 3)[:, 0]                                    # [B,T,S]
    kr, vr = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
    s = np.einsum("bthd,bshd->bhts", np.asarray(q), kr) * 8 ** -0.5
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, vr)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_inputs_embeds_and_cached_prefill() -> None:
    params = decoder.init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size, jnp.int32)
    plain = decoder.hidden_states(CFG, params, ids)
    embeds = decoder.embed(CFG, params, ids, jnp.float32)
    # the hook with the token embeddings is the default path, bit for bit
    np.testing.assert_array_equal(np.asarray(decoder.hidden_states(CFG, params, ids,
                                                                   inputs_embeds=embeds)),
                                  np.asarray(plain))
    # other embeddings and image blocks: the training forward and the KV-cache prefill agree
    embeds = embeds + 0.1 * jax.random.normal(jax.random.key(2), embeds.shape)
    blocks = jnp.asarray(IDS)
    full = decoder.hidden_states(CFG, params, ids, inputs_embeds=embeds, bidirectional_ids=blocks)
    assert not np.allclose(np.asarray(full), np.asarray(
        decoder.hidden_states(CFG, params, ids, inputs_embeds=embeds)), atol=1e-4)
    cache = init_cache(CFG, jnp.zeros((2,), jnp.int32), 16, jnp.float32)
    cached, _ = cached_hidden_states(CFG, params, ids, cache, fresh=True, inputs_embeds=embeds,
                                     bidirectional_ids=blocks)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_image_blocks_under_a_mesh() -> None:
    """Under a (data, tensor) mesh the ids travel batch-split with the segment ids."""
    from fastlora_jax.sharding import MeshConfig

    kq, kk, kv = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(kq, (2, 10, 4, 8))
    k = jax.random.normal(kk, (2, 10, 2, 8))
    v = jax.random.normal(kv, (2, 10, 2, 8))
    kwargs = dict(segment_ids=jnp.asarray(SEG), sliding_window=3, impl="reference",
                  bidirectional_ids=jnp.asarray(IDS))
    want = ops.attention(q, k, v, **kwargs)
    mesh = MeshConfig(data=2, fsdp=1, tensor=2).make_mesh(jax.devices()[:4])
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: ops.attention(q, k, v, **kwargs))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
