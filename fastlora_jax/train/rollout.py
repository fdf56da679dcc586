"""Rollouts for GRPO: sample completions of token prompts from the policy (adapters unmerged).

The trainer sees one function, `sample_completions(cfg, frozen, lora, prompts, params, seed)`,
that returns each completion's token ids (cut after its first EOS, which it keeps). It runs on
the very arrays the update trains — the frozen tree (possibly NF4) and the float32 LoRA tree,
never merged or copied.

This implementation re-runs the whole fixed-size buffer every token (one compiled
`lax.while_loop`), which is exact but costs O(length) forwards per token; the KV-cache decoder
replaces it behind the same function.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import ConfigError
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params
from fastlora_jax.train.logprobs import sequence_hidden
from fastlora_jax.train.step import StepConfig


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """transformers' sampling knobs (top_k 0 and top_p 1.0 disable those filters)."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_completion_length={self.max_new_tokens} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 for sampling")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p} must be in [0, 1]")


def filter_logits(logits: jax.Array, p: SamplingParams) -> jax.Array:
    """transformers' warpers in generate's order: temperature, top-k, top-p, min-p. [B, V] fp32."""
    logits = logits.astype(jnp.float32) / p.temperature
    neg = jnp.finfo(jnp.float32).min
    if p.top_k > 0:
        kth = jax.lax.top_k(logits, min(p.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if p.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)                          # ascending, as transformers
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= 1 - p.top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)            # keep at least one token
        remove = jnp.zeros_like(remove_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    if p.min_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)
        threshold = p.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < threshold, neg, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "params"))
def _sample_buffer(frozen: Params, lora: Params | None, buffer: jax.Array, mask: jax.Array,
                   key: jax.Array, *, cfg: StepConfig, params: SamplingParams) -> jax.Array:
    """buffer/mask [B, P + N] with left-padded prompts in the first P columns -> [B, N] tokens
    (pad after each row's EOS)."""
    rows, width = buffer.shape
    start = width - params.max_new_tokens
    eos = jnp.asarray(params.eos_token_ids, jnp.int32)
    w = decoder.lm_head_weight(cfg.model, frozen)

    def body(state):
        i, buf, msk, done, key = state
        h = sequence_hidden(cfg, frozen, lora, buf, msk)                          # [B, W, H]
        last = jax.lax.dynamic_index_in_dim(h, start + i - 1, axis=1, keepdims=False)
        logits = jnp.einsum("bh,vh->bv", last, w.astype(last.dtype),
                            preferred_element_type=jnp.float32)
        if cfg.model.final_logit_softcap is not None:
            cap = cfg.model.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        key, sub = jax.random.split(key)
        token = jax.random.categorical(sub, filter_logits(logits, params), axis=-1)
        token = jnp.where(done, params.pad_token_id, token).astype(jnp.int32)
        buf = jax.lax.dynamic_update_index_in_dim(buf, token, start + i, axis=1)
        msk = jax.lax.dynamic_update_index_in_dim(msk, (~done).astype(msk.dtype), start + i, 1)
        done = done | jnp.any(token[:, None] == eos[None, :], axis=-1)
        return i + 1, buf, msk, done, key

    def cond(state):
        return (state[0] < params.max_new_tokens) & ~jnp.all(state[3])

    init = (jnp.int32(0), buffer, mask, jnp.zeros((rows,), bool), key)
    _, buffer, mask, _, _ = jax.lax.while_loop(cond, body, init)
    return jnp.where(mask[:, start:] > 0, buffer[:, start:], params.pad_token_id)


def sample_completions(cfg: StepConfig, frozen: Params, lora: Params | None,
                       prompts: list[list[int]], params: SamplingParams,
                       seed: int) -> list[list[int]]:
    """Sampled completion ids per prompt (up to and including the first EOS)."""
    if not prompts:
        raise ConfigError("no prompts to sample from")
    width = max(len(p) for p in prompts)
    rows = len(prompts)
    buffer = np.full((rows, width + params.max_new_tokens), params.pad_token_id, np.int32)
    mask = np.zeros_like(buffer)
    for r, p in enumerate(prompts):
        buffer[r, width - len(p):width] = p
        mask[r, width - len(p):width] = 1
    out = np.asarray(_sample_buffer(frozen, lora, jnp.asarray(buffer), jnp.asarray(mask),
                                    jax.random.key(seed), cfg=cfg, params=params))
    eos = set(params.eos_token_ids)
    completions = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:cut])
    return completions

