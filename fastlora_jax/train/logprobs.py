"""Per-token log-probabilities and entropies of completions, without the [tokens, vocab] logits.

The policy (adapters on), the old policy (the same, before the update) and the reference (the
same frozen tree with the adapters off: `lora=None`) are three calls of one function; no second
model is ever loaded.

Sequence layout (TRL's): each row is a left-padded prompt of width P followed by a right-padded
completion of width C, `input_ids` [B, P + C]. `attention_mask` [B, P + C] marks real tokens.
Positions count real tokens only (a left-padded prompt starts at position 0, as in generation)
and padding gets segment 0, so no real token attends to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.lora.layer import lora_project, with_constants
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params
from fastlora_jax.train.loss import token_chunks
from fastlora_jax.train.step import StepConfig, remat_wrapper


def _chunk_stats(h: jax.Array, w: jax.Array, targets: jax.Array, softcap: float | None,
                 temperature: float) -> tuple[jax.Array, jax.Array]:
    """h [K, H], w [V, H], targets [K] -> (log p(target) [K], entropy [K]), float32."""
    logits = jnp.einsum("kh,vh->kv", h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32)                      # [K, V] fp32
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = logits / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)                                     # [K]
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]        # [K]
    probs = jnp.exp(logits - logz[:, None])
    entropy = logz - jnp.sum(probs * logits, axis=-1)
    return picked - logz, entropy


def token_logprobs(h: jax.Array, w: jax.Array, targets: jax.Array, *, chunk: int = 1024,
                   softcap: float | None = None,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """log p(targets) and the entropy of the next-token distribution at every position.

    h [..., H] hidden states (each predicting the target beside it), w [V, H], targets [...]
    int32 (any valid id; mask the result). Logits are divided by `temperature` (TRL scores
    completions at the sampling temperature). A `lax.scan` over chunks of `chunk` tokens with a
    rematerialised body keeps peak memory at O(chunk * V). Returns two float32 arrays [...].
    """
    shape, n = targets.shape, targets.size

    @jax.checkpoint
    def body(_: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return None, _chunk_stats(xs[0], w, xs[1], softcap, temperature)

    _, (logp, ent) = jax.lax.scan(body, None, token_chunks(h, targets, chunk, 0))
    return logp.reshape(-1)[:n].reshape(shape), ent.reshape(-1)[:n].reshape(shape)


def token_logprobs_reference(logits: jax.Array, targets: jax.Array,
                             temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The same from full logits [..., V] (the definition the chunked path must equal)."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    picked = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def positions_and_segments(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, S] 0/1 mask -> (positions counting real tokens from 0, segment ids: 1 real, 0 pad)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0), mask


def sequence_hidden(cfg: StepConfig, frozen: Params, lora: Params | None, input_ids: jax.Array,
                    attention_mask: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Final hidden states [B, S, H] of the policy (`lora`) or of the base model (`lora=None`)."""
    positions, segments = positions_and_segments(attention_mask)
    kwargs = dict(positions=positions, segment_ids=segments, attention_impl=cfg.attention_impl,
                  remat=remat_wrapper(cfg.remat))
    project = lora_project(cfg.lora, train=dropout_key is not None, linear_impl=cfg.linear_impl)
    if lora is None:                                # the reference pass: adapters off
        return decoder.hidden_states(cfg.model, frozen, input_ids, project=project, **kwargs)
    return decoder.hidden_states(cfg.model, frozen, input_ids,
                                 lora=with_constants(lora, cfg.lora, dropout_key),
                                 project=project, **kwargs)


def completion_logprobs(cfg: StepConfig, frozen: Params, lora: Params | None,
                        input_ids: jax.Array, attention_mask: jax.Array, completion_width: int, *,
                        temperature: float = 1.0,
                        dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) [B, C] of the last `completion_width` tokens of each row.

    input_ids / attention_mask [B, P + C]; the token at column P + i is scored by the hidden
    state at column P + i - 1. Padded completion positions hold values; mask them.
    """
    width = input_ids.shape[1]
    h = sequence_hidden(cfg, frozen, lora, input_ids, attention_mask, dropout_key)
    h = h[:, width - completion_width - 1:width - 1]                              # [B, C, H]
    targets = input_ids[:, width - completion_width:]                             # [B, C]
    return token_logprobs(h, decoder.lm_head_weight(cfg.model, frozen), targets,
                          chunk=cfg.loss_chunk, softcap=cfg.model.final_logit_softcap,
                          temperature=temperature)


def sequence_logprob_sums(cfg: StepConfig, frozen: Params, lora: Params | None,
                          input_ids: jax.Array, attention_mask: jax.Array,
                          completion_mask: jax.Array, dropout_key: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For right-padded rows [B, S] with a 0/1 completion_mask over the same columns (DPO's
    layout): (sum of completion-token log-probs [B], their entropy sum [B], token count [B])."""
    h = sequence_hidden(cfg, frozen, lora, input_ids, attention_mask, dropout_key)
    logp, ent = token_logprobs(h[:, :-1], decoder.lm_head_weight(cfg.model, frozen),
                               input_ids[:, 1:], chunk=cfg.loss_chunk,
                               softcap=cfg.model.final_logit_softcap)
    mask = completion_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(logp * mask, -1), jnp.sum(ent * mask, -1), jnp.sum(mask, -1)
