"""Greedy decoding (the demo's chat answer and the parity test's continuation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import ModelConfig
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params


@functools.partial(jax.jit, static_argnames=("config",))
def _next_token(config: ModelConfig, params: Params, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """argmax of the logits at position length-1 of a fixed-size buffer tokens [1, T_max]."""
    h = decoder.hidden_states(config, params, tokens)                # [1, T_max, H]
    last = jax.lax.dynamic_index_in_dim(h, length - 1, axis=1, keepdims=False)  # [1, H]
    return jnp.argmax(decoder.logits_from_hidden(config, params, last), axis=-1)[0]


def greedy_generate(config: ModelConfig, params: Params, prompt_ids: list[int], *,
                    max_new_tokens: int, eos_token_id: int | list[int] | None = None) -> list[int]:
    """The greedy continuation of `prompt_ids` (new tokens only, stops after an EOS token).

    Causal attention makes the padded tail of the buffer invisible to earlier positions, so one
    compiled forward over a fixed buffer serves every step.
    """
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    total = len(prompt_ids) + max_new_tokens
    buffer = np.zeros((1, total), dtype=np.int32)
    buffer[0, :len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(_next_token(config, params, jnp.asarray(buffer), jnp.int32(length)))
        out.append(token)
        if token in eos:
            break
        buffer[0, length] = token
        length += 1
    return out
