"""Gemma (2B, 7B; `model_type: gemma`), and the Gemma-style keys that Gemma 2 and 3 share.

Quirks, as fields: RMSNorm multiplies by (1 + w) in float32 (`norm_offset=1`); embeddings are
scaled by sqrt(hidden_size), cast to the compute dtype (`embed_scale`); the MLP is GeGLU with
tanh-approximate GELU (`hidden_act` "gelu" in the original configs means that too, as in
transformers); head_dim is explicit (256 by default, not hidden/heads); embeddings are tied.
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import Activation, ModelConfig, _Reader
from fastlora_jax.models.family import Family
from fastlora_jax.models.llama import ALL_PROJECTIONS, parse_llama_like, unparse_llama_like

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu")  # what Gemma's hidden_act may say for tanh-GELU


def parse_gemma_like(r: _Reader, model_type: str, *, max_pos: int,
                     rope: bool = True) -> dict[str, Any]:
    """Keys shared by Gemma 1/2/3: llama-style sizes, (1 + w) norms, sqrt(H) embedding scale,
    attention_bias on q/k/v/o, causal attention only."""
    fields = parse_llama_like(r, model_type, head_dim=256, tie=True, max_pos=max_pos, rope=rope)
    bias = r.take("attention_bias", bool, False)
    r.expect("use_bidirectional_attention", (False,),
             "bidirectional attention (embedding models) is not supported; set it to false")
    fields.update(qkv_bias=bias, o_bias=bias, norm_offset=1.0,
                  embed_scale=float(fields["hidden_size"]) ** 0.5,
                  mlp_activation=Activation.GELU_TANH)
    return fields


def unparse_gemma_like(c: ModelConfig) -> dict[str, Any]:
    out = unparse_llama_like(c)
    out.update(attention_bias=c.qkv_bias, use_bidirectional_attention=False)
    return out


def _parse(r: _Reader) -> dict[str, Any]:
    fields = parse_gemma_like(r, "gemma", max_pos=8192)
    r.expect("hidden_act", GELU_TANH_NAMES, "Gemma's MLP is GeGLU with tanh-approximate GELU")
    # Older Gemma configs also carry `hidden_activation`; transformers' Gemma ignores it.
    r.expect("hidden_activation", (None,) + GELU_TANH_NAMES,
             "Gemma's MLP is GeGLU with tanh-approximate GELU")
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    return unparse_gemma_like(c)


GEMMA = Family(
    model_type="gemma",
    architecture="GemmaForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
)
