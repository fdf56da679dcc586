"""The KV-cache path of the shared decoder: the same blocks (`decoder.run_layers`), with a cache
threaded through them.

A `KVCache` is preallocated for `cache_len` slots. Rows are left-padded so that every row's
tokens end at the same slot: row b's real tokens occupy slots [start[b], length), its positions
are slot - start[b]. `cached_hidden_states` runs T new tokens at slots [length, length + T):
every layer writes its rotated keys and values there (`dynamic_update_slice` on the buffer the
layer scan carries, so the cache is updated in place) and attends over what is visible (the
row's real slots, causal, the layer's sliding window). `fresh=True` is the prefill of an empty
cache: attention then runs within the new tokens through `ops.attention` (flash kernels on GPU)
instead of over the whole cache.

Rope scaling that depends on the sequence length (dynamic NTK, LongRoPE) is evaluated per row at
the row's length after the new tokens, as transformers' `generate` does at each step: cached keys
keep the rope they were computed with. Transformers' Phi-3 recomputes everything once the
sequence first outgrows the original context (LongRoPE switches to its long factors); the
generation loop does the same (`fastlora_jax/generation/engine.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fastlora_jax import ops
from fastlora_jax.config import ModelConfig
from fastlora_jax.models.decoder import (Attend, Params, Project, embed, frozen_project,
                                         rms_norm, run_layers)
from fastlora_jax.models.rope import cos_sin
from fastlora_jax.ops.cached_attention import cached_attention


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, slot-major, in the compute dtype."""

    k: jax.Array       # [L, B, S, Hkv, D] rotated keys
    v: jax.Array       # [L, B, S, Hkv, D]
    start: jax.Array   # [B] int32: first real slot of each row (left padding before it)
    length: jax.Array  # [] int32: slots written so far (the same for every row)
    offset: jax.Array  # [B] int32: added to a row's positions (M-RoPE's rope delta; else 0)

    @property
    def cache_len(self) -> int:
        return self.k.shape[2]


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "start", "length", "offset"],
                                 meta_fields=[])


def init_cache(config: ModelConfig, start: jax.Array, cache_len: int, dtype: Any,
               offset: jax.Array | None = None) -> KVCache:
    """An empty cache of `cache_len` slots for rows whose real tokens begin at `start` [B]
    (positions shifted by `offset` [B], default 0)."""
    shape = (config.num_layers, start.shape[0], cache_len, config.num_kv_heads, config.head_dim)
    offset = jnp.zeros_like(start, jnp.int32) if offset is None else offset
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   start=jnp.asarray(start, jnp.int32), length=jnp.zeros((), jnp.int32),
                   offset=jnp.asarray(offset, jnp.int32))


def _cache_attend(config: ModelConfig, cache: KVCache, t: int, fresh: bool,
                  attention_impl: Any, bidirectional_ids: jax.Array | None = None) -> Attend:
    """Write each layer's new k / v at slots [length, length + t), then attend
    (`bidirectional_ids`: a prefill's image blocks, see `decoder.self_attention`)."""
    slots = cache.length + jnp.arange(t, dtype=jnp.int32)                       # [T]
    segment_ids = (slots[None, :] >= cache.start[:, None]).astype(jnp.int32)    # [B, T] 0 = pad

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None,
               state: tuple[jax.Array, jax.Array], layer: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        k_all, v_all = state
        at = (layer, 0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
        if fresh:
            out = ops.attention(q, k, v, segment_ids=segment_ids, causal=True,
                                sliding_window=window, softcap=config.attn_logit_softcap,
                                scale=config.attention_scale, impl=attention_impl,
                                bidirectional_ids=bidirectional_ids)
        else:
            out = cached_attention(q, k_all[layer], v_all[layer], q_slot=cache.length,
                                   kv_start=cache.start, sliding_window=window,
                                   softcap=config.attn_logit_softcap,
                                   scale=config.attention_scale)
        return out, (k_all, v_all)

    return attend


def cached_hidden_states(config: ModelConfig, params: Params, input_ids: jax.Array,
                         cache: KVCache, *, fresh: bool, lora: Params | None = None,
                         project: Project = frozen_project, attention_impl: Any = None,
                         seq_len: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
                         bidirectional_ids: jax.Array | None = None,
                         positions: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [B, T, H] of input_ids [B, T] at the cache's next T slots, and
    the cache with them written. `fresh` promises cache.length == 0 (a prefill). `seq_len` [B]
    is the row length that length-dependent rope scaling keys on (default: through the new
    tokens). inputs_embeds [B, T, H] replaces the token embeddings (a prefill with image
    features); bidirectional_ids [B, T] (fresh only) marks image blocks seen both ways.
    positions: the new tokens' rope positions if not (slot - start + offset), e.g. a
    multimodal prompt's M-RoPE positions [3, B, T]."""
    c = config
    t = input_ids.shape[1]
    slots = cache.length + jnp.arange(t, dtype=jnp.int32)
    if positions is None:
        positions = (jnp.maximum(slots[None, :] - cache.start[:, None], 0)
                     + cache.offset[:, None])                                   # [B, T]
    if seq_len is None:
        seq_len = cache.length + t - cache.start                                # [B]
    if inputs_embeds is None:
        h = embed(c, params, input_ids, cache.k.dtype)
    else:
        h = inputs_embeds.astype(cache.k.dtype)
    if bidirectional_ids is not None and not fresh:
        raise ValueError("bidirectional_ids apply to a prefill (fresh=True) only")
    ropes = {c.layer_rope(i) for i in range(c.num_layers)}
    tables = {rope: cos_sin(c, positions, rope, seq_len=seq_len) for rope in ropes}
    attend = _cache_attend(c, cache, t, fresh, attention_impl, bidirectional_ids)
    h, (k, v) = run_layers(c, params, lora, h, tables, project, attend, (cache.k, cache.v))
    h = rms_norm(h, params["norm"]["weight"], eps=c.rms_norm_eps, offset=c.norm_offset)
    return h, KVCache(k=k, v=v, start=cache.start, length=cache.length + t, offset=cache.offset)
