"""Qwen3 dense models (`model_type: qwen3`).

Qwen2's windows, no q/k/v bias (unless `attention_bias`, which covers o_proj too), an explicit
head_dim (default 128) and a Llama-style RMSNorm over head_dim on q and k before rope (`qk_norm`).
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.models.family import Family
from fastlora_jax.models.llama import ALL_PROJECTIONS, parse_llama_like, silu_act, unparse_llama_like
from fastlora_jax.models.qwen2 import parse_qwen_windows, unparse_qwen_windows


def _parse(r: _Reader) -> dict[str, Any]:
    fields = parse_llama_like(r, "qwen3", head_dim=128, max_pos=32768)
    bias = r.take("attention_bias", bool, False)
    fields.update(mlp_activation=silu_act(r), qkv_bias=bias, o_bias=bias, qk_norm=True,
                  **parse_qwen_windows(r, fields["num_layers"]))
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    return dict(unparse_llama_like(c), attention_bias=c.qkv_bias, **unparse_qwen_windows(c))


QWEN3 = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
)
