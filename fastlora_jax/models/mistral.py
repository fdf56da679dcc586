"""Mistral (7B v0.1-v0.3, Nemo, and other `model_type: mistral` checkpoints).

Llama's layout and math without biases, plus `sliding_window`: every layer attends to the last
`sliding_window` keys (None = full attention; v0.1 uses 4096, later releases null).
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.models.family import Family
from fastlora_jax.models.llama import ALL_PROJECTIONS, parse_llama_like, silu_act, unparse_llama_like


def _parse(r: _Reader) -> dict[str, Any]:
    fields = parse_llama_like(r, "mistral", max_pos=4096 * 32)
    fields.update(mlp_activation=silu_act(r),
                  sliding_window=r.take_or_null("sliding_window", int, 4096))
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    return dict(unparse_llama_like(c), sliding_window=c.sliding_window)


MISTRAL = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
)
