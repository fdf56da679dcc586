"""The Flax NNX model: structure and parameters in a Module, math in `decoder.py`.

Pure form for jit'd research code:

    graphdef, params = split(model)          # nnx.split
    logits = apply(graphdef, params, input_ids, positions=..., segment_ids=...)

Every parameter is an `nnx.Param` whose metadata `axes` holds its logical axis names
(see `fastlora_jax/sharding.py` for the rules that map them to mesh axes).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastlora_jax.config import ModelConfig
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params, get_path, param_specs


class CausalLM(nnx.Module):
    """A decoder-only language model. `model(input_ids)` -> logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig, params: Params, *, max_seq_length: int = 2048,
                 name_or_path: str = "") -> None:
        self.config = config
        self.max_seq_length = max_seq_length
        self.name_or_path = name_or_path
        tree: dict[str, Any] = {}
        for spec in param_specs(config):
            node = tree
            for key in spec.path[:-1]:
                node = node.setdefault(key, {})
            node[spec.path[-1]] = nnx.Param(get_path(params, spec.path), axes=spec.axes)
        for name, sub in tree.items():
            setattr(self, name, _to_nnx(sub))

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the pure form's `params`)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, attention_impl: Any = None) -> jax.Array:
        """input_ids int32 [B, T] -> logits [B, T, V]; positions / segment_ids int32 [B, T]."""
        return _forward_jit(self.config, self.params(), jnp.asarray(input_ids, jnp.int32),
                            positions=positions, segment_ids=segment_ids,
                            attention_impl=attention_impl)

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int = 64,
                 eos_token_id: int | list[int] | None = None) -> list[int]:
        """Greedy continuation of one prompt (new token ids only)."""
        from fastlora_jax.generate import greedy_generate

        return greedy_generate(self.config, self.params(), list(prompt_ids),
                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


def _to_nnx(tree: dict[str, Any]) -> nnx.Dict:
    return nnx.Dict({k: _to_nnx(v) if isinstance(v, dict) else v for k, v in tree.items()})


@functools.partial(jax.jit, static_argnames=("config", "attention_impl"))
def _forward_jit(config: ModelConfig, params: Params, input_ids: jax.Array, *,
                 positions: jax.Array | None, segment_ids: jax.Array | None,
                 attention_impl: Any) -> jax.Array:
    return decoder.forward(config, params, input_ids, positions=positions,
                           segment_ids=segment_ids, attention_impl=attention_impl)


def split(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the pure form of `model`."""
    return nnx.split(model)


def apply(graphdef: nnx.GraphDef, params: nnx.State, input_ids: jax.Array, **kwargs: Any) -> jax.Array:
    """Logits of the model `nnx.merge(graphdef, params)`; jit-friendly."""
    model = nnx.merge(graphdef, params)
    return decoder.forward(model.config, model.params(), jnp.asarray(input_ids, jnp.int32), **kwargs)
