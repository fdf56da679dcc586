"""Llama (2, 3, 3.1, 3.2; SmolLM2 and other `model_type: llama` checkpoints).

Also the shared reading and writing of llama-style config keys that the other families build on.
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import Activation, ModelConfig, _Reader, rope_to_hf
from fastlora_jax.errors import ConfigError
from fastlora_jax.models.family import Family


def parse_llama_like(r: _Reader, model_type: str, *, head_dim: int | None = None,
                     tie: bool = False, eps: float = 1e-6, max_pos: int = 2048,
                     rope: bool = True) -> dict[str, Any]:
    """The keys shared by llama-style configs; keyword arguments are the family's HF defaults
    (head_dim None = hidden_size // num_attention_heads). `rope=False` leaves the rope keys to
    the caller. The MLP activation is read by each family."""
    hidden = r.take("hidden_size", int)
    heads = r.take("num_attention_heads", int)
    if heads <= 0:
        raise ConfigError(f"{r.source}: num_attention_heads={heads} must be a positive int")
    head_dim = r.take("head_dim", int, head_dim or hidden // heads)
    r.expect("attention_dropout", (0.0, 0), "attention dropout is not implemented; set it to 0.0")
    fields = dict(
        model_type=model_type,
        vocab_size=r.take("vocab_size", int),
        hidden_size=hidden,
        intermediate_size=r.take("intermediate_size", int),
        num_layers=r.take("num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=r.take("num_key_value_heads", int, heads),
        head_dim=head_dim,
        rms_norm_eps=r.take("rms_norm_eps", float, eps),
        max_position_embeddings=r.take("max_position_embeddings", int, max_pos),
        tie_embeddings=r.take("tie_word_embeddings", bool, tie),
    )
    if rope:
        fields["rope"] = r.rope(head_dim)
    return fields


def unparse_llama_like(c: ModelConfig) -> dict[str, Any]:
    """HF keys of the shared fields (rope in the v4 dialect, `hidden_act`)."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_embeddings,
        hidden_act=c.mlp_activation.value, attention_dropout=0.0, **rope_to_hf(c.rope))


def silu_act(r: _Reader) -> Activation:
    """`hidden_act`, which must be silu (SwiGLU)."""
    return Activation(r.expect("hidden_act", ("silu",), "this family's MLP is SwiGLU"))


def _parse(r: _Reader) -> dict[str, Any]:
    fields = parse_llama_like(r, "llama")
    bias = r.take("attention_bias", bool, False)
    fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=r.take("mlp_bias", bool, False),
                  mlp_activation=silu_act(r))
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    if c.qkv_bias != c.o_bias:
        raise ConfigError(f"a llama config cannot express qkv_bias={c.qkv_bias} with "
                          f"o_bias={c.o_bias}: attention_bias covers q, k, v and o together")
    return dict(unparse_llama_like(c), attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
)
