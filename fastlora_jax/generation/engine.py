"""The generation engine as pure functions over (frozen, lora): prefill once, then a token loop
on the device.

    state = prefill(spec, frozen, lora, prompt, start, key, max_new)   # first token chosen
    state = decode(spec, frozen, lora, state, limit)                    # lax.while_loop
    tokens, mask, logprobs = completions(state, prompt_len)

`generate(...)` is the two composed, for a jit'd training loop (GRPO rollouts). `frozen` may
hold its layers stacked (as the model does) or one tree per layer (`decoder.unstack_layers`, the
CPU layout); `lora` is always the model's stacked tree. Prompts are
left-padded to one length P (row b's real tokens are prompt[b, start[b]:]); every row's result
equals its result alone. Adapters are applied unmerged (`lora` None = the base model).

The loop stops when every row has emitted an EOS token or `max_new` tokens exist (or at `limit`,
so a streaming caller can take the tokens in pieces and call `decode` again). A finished row
emits `pad_id` with mask False. Per-row random keys are derived from (key, row index, step), so
a row's samples do not depend on the batch it is in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from fastlora_jax.config import ModelConfig, RopeKind
from fastlora_jax.generation.sampling import SamplingConfig, process_logits, select
from fastlora_jax.lora.layer import lora_project, with_constants
from fastlora_jax.lora.spec import LoraSpec
from fastlora_jax.models.decoder import (Params, Project, frozen_project, logits_from_hidden,
                                         unstack_layers)
from fastlora_jax.models.kv_cache import KVCache, cached_hidden_states, init_cache


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything static about a generation (hashable: a jit static argument).

    cache_len: slots of the KV cache and the token buffer; >= P + max_new.
    eos_ids: token ids that end a row (empty: rows end at max_new only).
    logprobs: also record log p(token) under the model (log-softmax of its logits, float32).
    """

    config: ModelConfig
    lora_spec: LoraSpec | None
    sampling: SamplingConfig
    cache_len: int
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    logprobs: bool = False
    attention_impl: Any = None


@dataclasses.dataclass(frozen=True)
class GenState:
    """The loop's carry. Slot i of `tokens` holds the token at cache slot i (prompt, then
    generated); `cache.length` is the slot of the newest token, `last`, not yet in the cache."""

    cache: KVCache
    tokens: jax.Array         # [B, S] int32
    last: jax.Array           # [B] int32: the newest token (input of the next step)
    done: jax.Array           # [B] bool: emitted an EOS (or a padding row)
    lengths: jax.Array        # [B] int32: tokens generated through the row's EOS
    seen: jax.Array | None    # [B, V] bool: tokens in the row (repetition penalty only)
    logprobs: jax.Array | None  # [B, S] float32 at the generated slots (spec.logprobs only)
    keys: jax.Array           # [B] PRNG keys of the rows
    step: jax.Array           # [] int32: tokens generated so far
    max_new: jax.Array        # [] int32


jax.tree_util.register_dataclass(
    GenState, data_fields=[f.name for f in dataclasses.fields(GenState)], meta_fields=[])


def _adapters(spec: EngineSpec, frozen: Params,
              lora: Params | None) -> tuple[Params | None, Project]:
    """The LoRA tree the layers read (laid out like frozen's layers) and the projection."""
    if lora is None:
        return None, frozen_project
    lora = with_constants(lora, spec.lora_spec, None)
    if isinstance(frozen["layers"], tuple):
        lora = unstack_layers(lora, spec.config.num_layers)
    return lora, lora_project(spec.lora_spec, train=False)


def _refills(spec: EngineSpec) -> bool:
    """Whether a row can cross LongRoPE's original context inside the cache (see `_forward`)."""
    rope = spec.config.rope
    if rope.kind is not RopeKind.LONGROPE:
        return False
    orig = rope.original_max_position_embeddings or spec.config.max_position_embeddings
    return spec.cache_len > orig


def _choose(spec: EngineSpec, state: GenState, logits: jax.Array) -> GenState:
    """Pick each row's next token from logits [B, V] and record it at slot cache.length."""
    cfg = spec.sampling
    slot = state.cache.length
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, state.step))(state.keys)
    token = select(process_logits(logits, cfg, state.seen), cfg, step_keys)
    token = jnp.where(state.done, spec.pad_id, token)
    live = ~state.done
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, slot))
    logprobs = state.logprobs
    if spec.logprobs:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        logprobs = jax.lax.dynamic_update_slice(
            logprobs, jnp.where(live, picked, 0.0)[:, None], (0, slot))
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].max(live)
    eos = jnp.asarray(spec.eos_ids or (-1,), jnp.int32)
    done = state.done | jnp.any(token[:, None] == eos[None, :], axis=-1)
    return dataclasses.replace(state, tokens=tokens, last=token, done=done,
                               lengths=state.lengths + live.astype(jnp.int32), seen=seen,
                               logprobs=logprobs, step=state.step + 1)


def prefill(spec: EngineSpec, frozen: Params, lora: Params | None, prompt: jax.Array,
            start: jax.Array, key: jax.Array, max_new: jax.Array,
            row_ids: jax.Array | None = None, done: jax.Array | None = None,
            inputs_embeds: jax.Array | None = None,
            bidirectional_ids: jax.Array | None = None, positions: jax.Array | None = None,
            position_offset: jax.Array | None = None) -> GenState:
    """Run the left-padded prompt [B, P] (real tokens from start [B]) into a fresh cache and
    choose the first new token. row_ids [B] (default 0..B-1) seed each row's key; done [B]
    marks padding rows that never generate. inputs_embeds [B, P, H] / bidirectional_ids [B, P]:
    a vision-language prompt's embeddings (image features in place) and image blocks.
    positions: the prompt's rope positions (Qwen2.5-VL's M-RoPE [3, B, P]) instead of its
    token count; position_offset [B]: added to each generated token's (slot - start) position
    (M-RoPE's rope delta)."""
    c = spec.config
    b, p = prompt.shape
    dtype = frozen["embed_tokens"]["weight"].dtype
    lora_c, project = _adapters(spec, frozen, lora)
    cache = init_cache(c, start, spec.cache_len, dtype, position_offset)
    h, cache = cached_hidden_states(c, frozen, prompt, cache, fresh=True, lora=lora_c,
                                    project=project, attention_impl=spec.attention_impl,
                                    inputs_embeds=inputs_embeds,
                                    bidirectional_ids=bidirectional_ids, positions=positions)
    logits = logits_from_hidden(c, frozen, h[:, -1])
    tokens = jnp.zeros((b, spec.cache_len), jnp.int32).at[:, :p].set(prompt)
    seen = None
    if spec.sampling.uses_penalty:
        real = jnp.arange(p)[None, :] >= start[:, None]
        seen = jnp.zeros((b, c.vocab_size), bool).at[jnp.arange(b)[:, None], prompt].max(real)
    row_ids = jnp.arange(b, dtype=jnp.int32) if row_ids is None else row_ids
    state = GenState(
        cache=cache, tokens=tokens, last=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool) if done is None else done,
        lengths=jnp.zeros((b,), jnp.int32), seen=seen,
        logprobs=jnp.zeros((b, spec.cache_len), jnp.float32) if spec.logprobs else None,
        keys=jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids),
        step=jnp.zeros((), jnp.int32), max_new=jnp.asarray(max_new, jnp.int32))
    return _choose(spec, state, logits)


def _forward(spec: EngineSpec, frozen: Params, lora: Params | None,
             state: GenState) -> tuple[jax.Array, KVCache]:
    """Logits [B, V] after feeding `state.last` at slot cache.length, and the updated cache.

    LongRoPE (Phi-3): transformers drops its cache and recomputes the whole sequence at the
    step where it first outgrows the original context (the long factors then apply to every
    position, not only to the new one). A row crossing at this step triggers the same: a fresh
    prefill over the token buffer, each row with its own length; rows that crossed before, or
    not yet, get what their cache held back.
    """
    c = spec.config
    lora_c, project = _adapters(spec, frozen, lora)
    cache = state.cache

    def incremental(_: None) -> tuple[jax.Array, KVCache]:
        h, new = cached_hidden_states(c, frozen, state.last[:, None], cache, fresh=False,
                                      lora=lora_c, project=project,
                                      attention_impl=spec.attention_impl)
        return h[:, 0], new

    if not _refills(spec):
        h, cache = incremental(None)
        return logits_from_hidden(c, frozen, h), cache

    orig = c.rope.original_max_position_embeddings or c.max_position_embeddings
    row_len = cache.length + 1 - cache.start                                    # [B]

    def refill(_: None) -> tuple[jax.Array, KVCache]:
        empty = dataclasses.replace(cache, length=jnp.zeros((), jnp.int32))
        h, new = cached_hidden_states(c, frozen, state.tokens, empty, fresh=True, lora=lora_c,
                                      project=project, attention_impl=spec.attention_impl,
                                      seq_len=row_len)
        h = jax.lax.dynamic_index_in_dim(h, cache.length, axis=1, keepdims=False)
        return h, dataclasses.replace(new, length=cache.length + 1)

    crossing = jnp.any((row_len == orig + 1) & ~state.done)
    h, cache = jax.lax.cond(crossing, refill, incremental, None)
    return logits_from_hidden(c, frozen, h), cache


def decode(spec: EngineSpec, frozen: Params, lora: Params | None, state: GenState,
           limit: jax.Array | int | None = None) -> GenState:
    """Generate until every row is done, `state.max_new` tokens exist, or `limit` tokens exist
    (a `lax.while_loop`; the cache is carried and updated in place)."""
    stop = state.max_new if limit is None else jnp.minimum(jnp.asarray(limit, jnp.int32),
                                                           state.max_new)

    def cond(s: GenState) -> jax.Array:
        return (s.step < stop) & ~jnp.all(s.done)

    def body(s: GenState) -> GenState:
        # the new token's slot is the one after `last`'s: `_forward` advances cache.length
        logits, cache = _forward(spec, frozen, lora, s)
        return _choose(spec, dataclasses.replace(s, cache=cache), logits)

    return jax.lax.while_loop(cond, body, state)


def generate(spec: EngineSpec, frozen: Params, lora: Params | None, prompt: jax.Array,
             start: jax.Array, key: jax.Array, max_new: jax.Array | int) -> GenState:
    """prefill + decode to the end: the whole generation, jit-able as one function."""
    state = prefill(spec, frozen, lora, prompt, start, key, jnp.asarray(max_new, jnp.int32))
    return decode(spec, frozen, lora, state)


def completions(state: GenState, prompt_len: int,
                width: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(tokens [B, W] int32, mask [B, W] bool, logprobs [B, W] float32 or None) of the
    generated tokens, W = `width` (default cache_len - prompt_len)."""
    width = state.tokens.shape[1] - prompt_len if width is None else width
    tokens = jax.lax.dynamic_slice_in_dim(state.tokens, prompt_len, width, axis=1)
    mask = jnp.arange(width)[None, :] < state.lengths[:, None]
    logprobs = None
    if state.logprobs is not None:
        logprobs = jax.lax.dynamic_slice_in_dim(state.logprobs, prompt_len, width, axis=1)
    return tokens, mask, logprobs


prefill_jit = jax.jit(prefill, static_argnums=0)
decode_jit = jax.jit(decode, static_argnums=0, donate_argnums=3)
generate_jit = functools.partial(jax.jit, static_argnums=0)(generate)
