"""Next-token choice with transformers' semantics: its logits processors, in its order.

`process_logits` applies, like `GenerationMixin._get_logits_processor`: the repetition penalty
(greedy or sampled, over each row's real prompt tokens and what it generated), then, only when
sampling, temperature, top-k, top-p and min-p. Filtered entries become -inf. `select` takes the
argmax (greedy) or draws from softmax(processed scores) with a per-row key (sampling).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fastlora_jax.errors import GenerationError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen (transformers' `generate` arguments and defaults).

    do_sample: False = greedy (argmax after the repetition penalty); True = sample.
    temperature: divides the logits when sampling (> 0; 1 = unchanged).
    top_k: keep the k highest-scoring tokens when sampling (None or 0 = off; default 50).
    top_p: keep the smallest set of most probable tokens whose probability reaches top_p,
      in (0, 1] (1 = off).
    min_p: keep tokens whose probability is at least min_p x the top token's, in [0, 1]
      (None = off).
    repetition_penalty: > 0; a token already in the row (prompt or generated) has its logit
      divided by it when positive and multiplied by it when negative (1 = off).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> GenerationError:
            return GenerationError(f"{name}={getattr(self, name)!r} {why}")

        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "must be True or False")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise bad(name, "must be a number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (use do_sample=False for greedy decoding)")
        if self.do_sample and self.temperature == 0:
            raise bad("temperature", "must be > 0 when do_sample=True; for greedy decoding "
                                     "set do_sample=False")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 keeps every token)")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 0):
            raise bad("top_k", "must be a non-negative int or None (0 / None = off)")
        if self.min_p is not None and (isinstance(self.min_p, bool)
                                       or not isinstance(self.min_p, (int, float))
                                       or not 0 <= self.min_p <= 1):
            raise bad("min_p", "must be in [0, 1] or None (off)")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1 = no penalty)")

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


def divide(scores: jax.Array, value: float) -> jax.Array:
    """scores / value rounded as torch rounds it. XLA turns a division by a scalar into a
    multiplication by its reciprocal (off by one ulp in a fifth of the entries); a full array
    of the divisor behind a barrier keeps it a true division."""
    return scores / jax.lax.optimization_barrier(jnp.full(scores.shape, value, scores.dtype))


def penalize_repetitions(scores: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor: scores [B, V], seen [B, V] bool."""
    penalized = jnp.where(scores < 0, scores * penalty, divide(scores, penalty))
    return jnp.where(seen, penalized, scores)


def top_k_filter(scores: jax.Array, k: int) -> jax.Array:
    """TopKLogitsWarper: drop scores below the k-th highest (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: jax.Array, top_p: float) -> jax.Array:
    """TopPLogitsWarper: ascending sort, drop the tokens whose cumulative probability is
    <= 1 - top_p, always keeping the most probable one."""
    order = jnp.argsort(scores, axis=-1)                                     # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    rows = jnp.arange(scores.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


def min_p_filter(scores: jax.Array, min_p: float) -> jax.Array:
    """MinPLogitsWarper: drop tokens whose probability is below min_p x the top probability
    (the top token itself always stays)."""
    probs = jax.nn.softmax(scores, axis=-1)
    remove = probs < min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(remove, -jnp.inf, scores)


def process_logits(scores: jax.Array, cfg: SamplingConfig,
                   seen: jax.Array | None = None) -> jax.Array:
    """The processed float32 scores [B, V] that `select` picks from (transformers' order)."""
    scores = scores.astype(jnp.float32)
    if cfg.uses_penalty:
        scores = penalize_repetitions(scores, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        scores = divide(scores, cfg.temperature)
    if cfg.top_k:
        scores = top_k_filter(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = top_p_filter(scores, cfg.top_p)
    if cfg.min_p is not None:
        scores = min_p_filter(scores, cfg.min_p)
    return scores


def select(scores: jax.Array, cfg: SamplingConfig, keys: jax.Array) -> jax.Array:
    """int32 [B]: argmax of scores [B, V] (greedy; first index on ties, as torch), or a draw
    from softmax(scores) per row with keys [B] (sampling)."""
    if not cfg.do_sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scores).astype(
        jnp.int32)
